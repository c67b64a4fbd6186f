"""Generates the gRPC wire modules from their .proto file whenever the package is built.

Everything else about the package is in pyproject.toml. The generated modules (confide_pb2.py,
confide_pb2_grpc.py and their .pyi stubs) are written beside the .proto, in the source tree, before the normal
build copies the package: so a wheel, a plain install and an editable install (which runs from the source
tree) all have them, and no one edits or commits them.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SRC = ROOT / "src"
PROTO = Path("confide/runtime/grpc/confide.proto")


def generate_protocol() -> None:
    from grpc_tools import protoc  # a build requirement (pyproject.toml [build-system])

    include = Path(protoc.__file__).resolve().parent / "_proto"  # protobuf's own .proto files
    args = [
        "grpc_tools.protoc",
        f"-I{SRC}",
        f"-I{include}",
        f"--python_out={SRC}",
        f"--pyi_out={SRC}",
        f"--grpc_python_out={SRC}",
        str(SRC / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc could not compile {PROTO}")


class BuildWithProtocol(build_py):
    def run(self) -> None:
        generate_protocol()
        super().run()


setup(cmdclass={"build_py": BuildWithProtocol})
