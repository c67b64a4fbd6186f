"""The data of the language-model demo (examples/llm-base.toml, examples/llm-lora.toml), from Shakespeare.

Two parts that share no play, so that the fine-tuning sites' held-out lines were never seen in pretraining:

- the instruction data, ``examples/data/shakespeare-dialogue.jsonl`` (kept in git; this script rewrites it
  identically): for each speaking role of Hamlet, Romeo and Juliet, Macbeth and Julius Caesar with enough
  lines, 15 examples whose prompt is one of the role's lines and whose response is the line that follows.
  ``site`` is ``play/ROLE``: each site writes in its own voice (non-IID);
- the pretraining text, ``runs/llm-data/pretrain.jsonl``: every role of the other 33 plays, one site each.

    python examples/llm_data.py
"""

from __future__ import annotations

import json
from pathlib import Path

from confide.data import shakespeare

FINE_TUNE_PLAYS = ("hamlet", "romeo_and_juliet", "macbeth", "julius_caesar")
EXAMPLES_PER_SITE = 15
ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    roles = shakespeare.site_texts(None, 64)
    dialogue = ROOT / "examples" / "data" / "shakespeare-dialogue.jsonl"
    pretrain = ROOT / "runs" / "llm-data" / "pretrain.jsonl"
    pretrain.parent.mkdir(parents=True, exist_ok=True)
    examples = sites = 0
    with dialogue.open("w", encoding="utf-8") as tune, pretrain.open("w", encoding="utf-8") as text:
        for site, play, role_text in roles:
            if play not in FINE_TUNE_PLAYS:
                text.write(json.dumps({"site": site, "text": role_text}) + "\n")
                continue
            lines = [line.strip() for line in role_text.splitlines() if len(line.strip()) >= 8]
            # Evenly spaced pairs over the role's whole part, not just its first scene.
            step = max(1, (len(lines) - 1) // EXAMPLES_PER_SITE)
            pairs = [(lines[i], lines[i + 1]) for i in range(0, len(lines) - 1, step)][:EXAMPLES_PER_SITE]
            for prompt, response in pairs:
                tune.write(json.dumps({"site": site, "prompt": prompt, "response": response}) + "\n")
            examples += len(pairs)
            sites += 1
    print(f"{dialogue.relative_to(ROOT)}: {examples} examples of {sites} sites; {pretrain.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
