"""A run's model in Hugging Face's formats, so that the whole ecosystem can load it (``confide export``).

- confide's character GPT becomes a ``transformers`` GPT-2 (:func:`gpt_to_transformers`): the two are the same
  network, so the export is a renaming of tensors, exact to the last bit of every weight. With it goes a
  character tokenizer built with ``tokenizers`` (:func:`char_tokenizer`) that gives the very ids of
  :class:`~confide.data.tokenize.CharTokenizer` for any text. A model trained federatedly from scratch can
  then be loaded by ``AutoModelForCausalLM.from_pretrained`` and fine-tuned with adapters like any other.
- A LoRA adapter trained on a Hugging Face base (``model.kind = "hf"``) is written in PEFT's own format
  (:func:`export_adapter`), and on request merged into the base weights.

The mapping of confide's GPT onto GPT-2 (Radford et al. 2019), both pre-LayerNorm with learned positions:

=====================================  ==========================================  =========================
confide (:mod:`confide.models.gpt`)    transformers ``GPT2LMHeadModel``            how
=====================================  ==========================================  =========================
``tok.weight`` (vocab, width)          ``transformer.wte.weight``                  same; ``lm_head`` tied
``pos.weight`` (context, width)        ``transformer.wpe.weight``                  same; n_positions=context
``blocks.i.ln1`` / ``ln2``             ``transformer.h.i.ln_1`` / ``ln_2``         same; eps 1e-5 both
``blocks.i.attn.qkv`` (Linear)         ``transformer.h.i.attn.c_attn`` (Conv1D)    weight transposed
``blocks.i.attn.proj``                 ``transformer.h.i.attn.c_proj``             weight transposed
``blocks.i.mlp.fc`` / ``mlp.proj``     ``transformer.h.i.mlp.c_fc`` / ``c_proj``   weight transposed
``ln_f``                               ``transformer.ln_f``                        same
=====================================  ==========================================  =========================

Conv1D keeps its weight as (in, out) where Linear keeps (out, in), hence the transposes. Queries, keys and
values are split in the same order and into heads the same way, and both scale attention by 1/sqrt(head
width). confide's MLP uses the exact (erf) GELU, so the export sets ``activation_function = "gelu"`` (GPT-2's
own default, ``gelu_new``, is the tanh approximation and would change the logits). GPT-2 always has biases:
a confide model built with ``bias = false`` is exported with zero biases, which computes the same function.

Every import of ``transformers``, ``tokenizers`` and ``peft`` is inside a function: confide imports and runs
without them, and only an export needs them.

A little over ~400 lines: the tokenizer, the GPT-2 mapping, the adapter export and the reading of a run are
each short, and kept in the one module that ``confide export`` drives.
"""

from __future__ import annotations

import copy
import importlib
import secrets
import shutil
import tomllib
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

# _TYPOGRAPHY: the very table CharTokenizer.normalize applies first, which the exported tokenizer must repeat.
from confide.data.tokenize import _TYPOGRAPHY, DEFAULT_TOKENIZER
from confide.errors import ConfideError, StoreError

if TYPE_CHECKING:
    from torch import Tensor

    from confide.models.gpt import GPT, Block
    from confide.models.hf import HFCausalLM

__all__ = [
    "Exported",
    "char_tokenizer",
    "export_adapter",
    "export_gpt",
    "export_run",
    "gpt2_config",
    "gpt_to_transformers",
]

_EXPORT_MARKERS = ("config.json", "adapter_config.json")
"""Files of which one is in every export: ``--force`` replaces only a folder that holds one."""


def _require(module: str) -> Any:
    """``module``, or a ConfideError that says how to install what an export needs."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfideError(
            f"exporting a model needs {module.split('.')[0]!r}, which is not installed ({e}); install the "
            "language-model extra: pip install 'confide[llm]'"
        ) from None


# -- the character tokenizer -------------------------------------------------------------------------------


def _combining_class_pattern() -> str:
    """A regex class of every code point with a non-zero canonical combining class, as Python's
    ``unicodedata.combining`` (which CharTokenizer drops after NFKD) knows them."""
    ranges: list[tuple[int, int]] = []
    start: int | None = None
    for point in range(0x110000):
        combining = unicodedata.combining(chr(point)) != 0
        if combining and start is None:
            start = point
        elif not combining and start is not None:
            ranges.append((start, point - 1))
            start = None
    return "[" + "".join(f"\\x{{{a:x}}}-\\x{{{b:x}}}" for a, b in ranges) + "]"


def _class(chars: Iterable[str]) -> str:
    """A regex class of exactly ``chars`` (written as code points, so none is read as regex syntax)."""
    return "[" + "".join(f"\\x{{{ord(c):x}}}" for c in chars) + "]"


def _char_normalizer(vocabulary: dict[str, int], unknown: int) -> Any:
    """CharTokenizer's normalisation as a ``tokenizers`` normalizer: typography to ASCII, NFKD, combining
    marks dropped.

    ``tokenizers`` ships its own Unicode tables, of another Unicode version than Python's ``unicodedata``
    perhaps: each character whose decomposition there would give other ids (a handful of recent ones) is
    replaced by Python's decomposition before NFKD runs, so the ids agree for every code point. Characters
    with one replacement share one pass over the text: each pass costs about as much as the whole NFKD.
    """
    tokenizers = _require("tokenizers")
    normalizers = tokenizers.normalizers
    nfkd = normalizers.NFKD()

    def ids(text: str) -> list[int]:
        return [vocabulary.get(c, unknown) for c in text if not unicodedata.combining(c)]

    replacements: dict[str, list[str]] = {}
    for point, text in _TYPOGRAPHY.items():
        replacements.setdefault(str(text), []).append(chr(point))
    for point in range(0x110000):
        char = chr(point)
        if unicodedata.decomposition(char):
            python = unicodedata.normalize("NFKD", char)
            if ids(nfkd.normalize_str(char)) != ids(python):
                replacements.setdefault(python, []).append(char)
    return normalizers.Sequence(
        [
            *(
                normalizers.Replace(tokenizers.Regex(_class(chars)), text)
                for text, chars in replacements.items()
            ),
            nfkd,
            normalizers.Replace(tokenizers.Regex(_combining_class_pattern()), ""),
        ]
    )


def char_tokenizer(model_max_length: int) -> Any:
    """confide's character vocabulary as a ``transformers`` tokenizer (a ``PreTrainedTokenizerFast``).

    A model over the 97 symbols (the id of a symbol is its CharTokenizer code) that reads one character at a
    time, and decoding that joins them with nothing between. The unknown symbol doubles as the
    padding token (confide's vocabulary has no padding code; a padded position is masked out anyway). No
    beginning- or end-of-text token is added: confide's models never saw one. The tokenizer returns no
    ``token_type_ids``, which GPT-2 would add to its input as extra embeddings.
    """
    tokenizers = _require("tokenizers")
    transformers = _require("transformers")
    symbols = DEFAULT_TOKENIZER.decode(np.arange(DEFAULT_TOKENIZER.vocab_size))
    unknown = symbols[DEFAULT_TOKENIZER.unknown]
    vocabulary = {s: i for i, s in enumerate(symbols)}
    # Byte-pair encoding with no merges reads a text one character at a time, with no pre-tokenizer.
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocabulary, [], unk_token=unknown))
    backend.normalizer = _char_normalizer(vocabulary, DEFAULT_TOKENIZER.unknown)
    backend.decoder = tokenizers.decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=unknown,
        pad_token=unknown,
        model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,  # its clean-up would eat the spaces before punctuation
    )


# -- confide's GPT as GPT-2 --------------------------------------------------------------------------------


def gpt2_config(model: GPT) -> Any:
    """The ``GPT2Config`` of the network ``model`` is (see the mapping in this module's docstring)."""
    transformers = _require("transformers")
    c = model.config
    return transformers.GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.context,
        n_embd=c.width,
        n_layer=c.layers,
        n_head=c.heads,
        n_inner=4 * c.width,
        activation_function="gelu",
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
    )


def _gpt2_state_dict(model: GPT) -> dict[str, Tensor]:
    """``model``'s weights under GPT-2's names and shapes (zeros where confide has no bias)."""
    import torch

    def norm(prefix: str, layer: torch.nn.LayerNorm) -> dict[str, Tensor]:
        bias = layer.bias if layer.bias is not None else torch.zeros_like(layer.weight)
        return {f"{prefix}.weight": layer.weight, f"{prefix}.bias": bias}

    def conv(prefix: str, layer: torch.nn.Linear) -> dict[str, Tensor]:
        bias = layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_features)
        return {f"{prefix}.weight": layer.weight.t(), f"{prefix}.bias": bias}

    out = {
        "transformer.wte.weight": model.tok.weight,
        "transformer.wpe.weight": model.pos.weight,
        "lm_head.weight": model.tok.weight,
        **norm("transformer.ln_f", model.ln_f),
    }
    for i, block in enumerate(cast("Sequence[Block]", model.blocks)):
        h = f"transformer.h.{i}"
        out |= norm(f"{h}.ln_1", block.ln1) | norm(f"{h}.ln_2", block.ln2)
        out |= conv(f"{h}.attn.c_attn", block.attn.qkv) | conv(f"{h}.attn.c_proj", block.attn.proj)
        out |= conv(f"{h}.mlp.c_fc", block.mlp.fc) | conv(f"{h}.mlp.c_proj", block.mlp.proj)
    return {name: tensor.detach().contiguous().clone() for name, tensor in out.items()}


def gpt_to_transformers(model: GPT) -> Any:
    """A ``GPT2LMHeadModel`` (in eval mode) that computes what ``model`` computes, with its weights."""
    transformers = _require("transformers")
    hf = transformers.GPT2LMHeadModel(gpt2_config(model))
    # strict: a tensor left out or misnamed would otherwise keep its random initial value, silently.
    hf.load_state_dict(_gpt2_state_dict(model), strict=True)
    hf.tie_weights()
    return hf.eval()


def export_gpt(model: GPT, out_dir: Path, *, force: bool = False) -> Path:
    """Write ``model`` as a GPT-2 (``config.json``, ``model.safetensors``) with its character tokenizer to
    ``out_dir``, as ``save_pretrained`` writes them; ``AutoModelForCausalLM`` and ``AutoTokenizer`` load it.
    """
    hf = gpt_to_transformers(model)
    tokenizer = char_tokenizer(model_max_length=model.config.context)
    with _fresh_directory(out_dir, force) as folder:
        hf.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return out_dir


# -- LoRA adapters on a Hugging Face base ------------------------------------------------------------------


def export_adapter(
    peft_model: Any, out_dir: Path, merged: bool = False, tokenizer: Any = None, *, force: bool = False
) -> Path:
    """Write a ``peft`` model's adapter to ``out_dir`` in PEFT's format (``adapter_config.json`` and
    ``adapter_model.safetensors``: ``PeftModel.from_pretrained(base, out_dir)`` loads it).

    With ``merged``, ``out_dir`` holds instead the base with the adapter merged into its weights
    (``merge_and_unload``), as ``save_pretrained`` writes a model, so ``AutoModelForCausalLM`` loads it
    without peft; the adapter itself goes to ``out_dir/adapter``. The merge runs on a copy, so the model
    passed in keeps its adapter and its base weights bit for bit (a site's base must stay the one whose hash
    it joined with), at the cost of a second copy of the model in memory while it runs. ``tokenizer``, when
    given, is saved beside the model.

    This is the function the runs of ``model.kind = "hf"`` export through: load the run's base with its
    adapter, write the checkpoint's adapter vector into it, and pass it here.
    """
    peft = _require("peft")
    if not isinstance(peft_model, peft.PeftModel):
        raise TypeError(f"export_adapter needs a peft.PeftModel, got {type(peft_model).__name__}")
    with _fresh_directory(out_dir, force) as folder:
        if merged:
            copy.deepcopy(peft_model).merge_and_unload().save_pretrained(folder)
            peft_model.save_pretrained(folder / "adapter")
        else:
            peft_model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    return out_dir


# -- a run directory ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exported:
    """What :func:`export_run` wrote: the round of the model (of ``rounds``), its kind, and, in
    ``description``, what it is and what loads it."""

    round: int
    rounds: int
    kind: str
    out_dir: Path
    description: str


def export_run(
    run_dir: Path, out_dir: Path, *, merged: bool = False, round: int | None = None, force: bool = False
) -> Exported:
    """Export the global model of the run in ``run_dir``: that of its last round once the run has finished,
    or that of checkpoint ``round``.

    Raises a StoreError or ConfideError (one line each) when there is no such run, the run has not finished
    and no round is given, the round has no checkpoint, the kind of model has no export, or ``out_dir`` holds
    files (unless ``force`` and they are a previous export).
    """
    if not run_dir.is_dir():
        raise StoreError(f"there is no run directory {run_dir}; give the folder `confide run` wrote")
    _check_out_dir(out_dir, force)  # before the work, not after it
    kind = _model_kind(run_dir)
    if kind == "hf":
        return _export_hf_run(run_dir, out_dir, merged=merged, round=round, force=force)
    if kind != "gpt":
        raise ConfideError(
            f"{run_dir} trained a model.kind = {kind!r} model, which has no transformers architecture to "
            "export to (transformers has no character-level LSTM language model); `confide export` writes "
            "'gpt' runs (as GPT-2) and 'hf' runs (their LoRA adapter)"
        )
    if merged:
        raise ConfideError(
            "--merged is for adapter runs (model.kind = 'hf'); a 'gpt' run is exported as a whole model "
            "already: leave --merged out"
        )
    from confide import config as config_module
    from confide.core import Layout
    from confide.runtime.stack import build_model_for

    config = config_module.load(run_dir / "config.toml")
    model = build_model_for(config, DEFAULT_TOKENIZER.vocab_size)
    layout = Layout.of_module(model)
    chosen, weights = _global_weights(run_dir, round, config.run.rounds, layout.size)
    layout.check(weights, "checkpoint's weights")
    layout.write(model, weights)
    export_gpt(cast("GPT", model), out_dir, force=force)
    return Exported(
        chosen,
        config.run.rounds,
        kind,
        out_dir,
        "a GPT-2 with confide's character tokenizer; load them with AutoModelForCausalLM.from_pretrained"
        f"({str(out_dir)!r}) and AutoTokenizer.from_pretrained({str(out_dir)!r})",
    )


def _export_hf_run(run_dir: Path, out_dir: Path, *, merged: bool, round: int | None, force: bool) -> Exported:
    """The export of a ``model.kind = "hf"`` run: its base (from the same ``model.path`` or config the run
    started from) with the checkpoint's trainable vector written in; with LoRA, the adapter in PEFT's format
    (or merged into the base), and without an adapter the whole model."""
    from confide import config as config_module
    from confide.core import Layout
    from confide.runtime.stack import build_model_for

    peft = _require("peft")
    config = config_module.load(run_dir / "config.toml")
    model = cast("HFCausalLM", build_model_for(config, DEFAULT_TOKENIZER.vocab_size))  # its own tokenizer
    layout = Layout.of_module(model)
    chosen, weights = _global_weights(run_dir, round, config.run.rounds, layout.size)
    layout.check(weights, "checkpoint's weights")
    layout.write(model, weights)
    lm, tokenizer = model.lm, model.tokenizer
    if isinstance(lm, peft.PeftModel):
        export_adapter(lm, out_dir, merged, tokenizer, force=force)
        where = repr(str(out_dir))
        description = (
            f"the base with its adapter merged in; load it with AutoModelForCausalLM.from_pretrained({where})"
            if merged
            else f"a LoRA adapter in PEFT's format; load it with PeftModel.from_pretrained(base, {where})"
        )
    else:
        if merged:
            raise ConfideError(
                "--merged merges an adapter into its base, and this run trained every weight "
                "(adapter.kind = 'none'): leave --merged out"
            )
        with _fresh_directory(out_dir, force) as folder:
            lm.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        description = (
            f"the whole model and its tokenizer; load them with AutoModelForCausalLM.from_pretrained"
            f"({str(out_dir)!r})"
        )
    return Exported(chosen, config.run.rounds, "hf", out_dir, description)


def _model_kind(run_dir: Path) -> str:
    """The run's ``model.kind``, read before the config is checked (which needs the kind's model code)."""
    path = run_dir / "config.toml"
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(
            f"{run_dir} is not a confide run directory (it has no config.toml, which `confide run` writes)"
        ) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise StoreError(f"the run's config {path} cannot be read: {e}") from None
    return str(raw.get("model", {}).get("kind", "gpt"))


def _global_weights(run_dir: Path, round: int | None, rounds: int, size: int) -> tuple[int, np.ndarray]:
    """The round and flat weights (``size`` values) of the global model to export, from the run's
    checkpoints."""
    from confide.runtime.store import Store

    store = Store.open(run_dir)
    try:
        stored = store.checkpoint_rounds()
        status = store.meta("status") or "running"
        if not stored:
            raise StoreError(
                f"{run_dir} has no stored model yet: the first is written after round "
                f"run.checkpoint_every; continue the run with `confide run --resume {run_dir}`"
            )
        last = stored[-1]
        if round is None:
            if status == "running":
                raise StoreError(
                    f"the run in {run_dir} has not finished (its last stored model is of round {last} of "
                    f"{rounds}): finish it with `confide run --resume {run_dir}`, or export that model with "
                    f"--round {last}"
                )
            round = last
        if round not in stored:
            raise StoreError(
                f"{run_dir} has no stored model of round {round}; it has those of rounds "
                f"{', '.join(map(str, stored))} (one every run.checkpoint_every rounds, and the last)"
            )
        try:
            weights = store.checkpoint(round).weights
        except StoreError as e:
            raise StoreError(f"{e}; export another --round") from None
        # Under CKKS, only with a simulated site's key from the run store.
        return round, store.readable(weights, size)
    finally:
        store.close()


# -- the output folder -------------------------------------------------------------------------------------


def _check_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse an output folder that holds files, before any work, unless ``force`` and it is an export."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfideError(f"--out {out_dir} is a file; give a folder to write the export into")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not force:
        raise ConfideError(
            f"--out {out_dir} already exists and is not empty; choose another folder, or add --force to "
            "replace the export in it"
        )
    if not any((out_dir / marker).is_file() for marker in _EXPORT_MARKERS):
        raise ConfideError(
            f"--out {out_dir} holds files that are not a model export (it has no config.json or "
            "adapter_config.json), so --force does not replace it; choose another folder"
        )


@contextmanager
def _fresh_directory(out_dir: Path, force: bool) -> Iterator[Path]:
    """A new folder to write the export into, which becomes ``out_dir`` once complete: an export that
    fails half-way leaves nothing at ``out_dir``, and one with ``force`` replaces the old export whole (no
    file of it left beside the new one)."""
    _check_out_dir(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its folder is private to the user (0700), and the export should have the
    # permissions any new folder gets here.
    folder = out_dir.parent / f".{out_dir.name}.{secrets.token_hex(6)}.partial"
    folder.mkdir()
    try:
        yield folder
        if out_dir.is_dir():
            old = folder.with_suffix(".old")
            out_dir.rename(old)
            folder.rename(out_dir)
            shutil.rmtree(old)
        else:
            folder.rename(out_dir)
    finally:
        if folder.exists():
            shutil.rmtree(folder)
