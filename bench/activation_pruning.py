"""FLAP's activation importance (#18) against gradient and magnitude rankings on MiniLM, with no recovery training.

    python -m bench.activation_pruning          # about 6 minutes on a shared 2-core machine; not a timing

MiniLM (all-MiniLM-L6-v2, 6 layers x 12 heads) loses a third of its heads in every layer (``ranking="per_layer"``,
24 of 72), or a third of its FFN neurons; 128 Debian train texts calibrate (scoring, statistics), 480 Debian test
texts measure: the mean cosine of the mean-pooled embeddings to the fp32 model's. Each ranking is shown without and
with FLAP's bias compensation (the removed units' mean output added to the output projection's bias: for the
gradient and magnitude choices, by re-applying their explicit map with ``importance="activation"``).

Measured (Dec 2026, this script as it stands; plain / compensated): heads magnitude 0.8486 / 0.8616, gradient
0.8862 / 0.9073, activation one-pass 0.8608 / 0.9022, sequential 0.8688 / 0.8967; FFN magnitude 0.7805, gradient
0.8794, activation one-pass 0.8558 / 0.9294, sequential 0.8327 / 0.9318.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses

import torch

from bench.harness import load_minilm
from hf_compress import apply_compression, get_recipe
from hf_compress.data import load_debian
from hf_compress.pruning import FFNPruningConfig, HeadPruningConfig
from hf_compress.sequential import sequential_compress


def embeddings(model, tokenizer, texts: list[str], batch: int = 32) -> torch.Tensor:
    """Mean-pooled last hidden states (padding excluded)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            encoded = tokenizer(texts[start : start + batch], padding=True, truncation=True, max_length=128,
                                return_tensors="pt")  # fmt: skip
            states = model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).float()
            out.append((states * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=1 / 3, help="Share of heads (and FFN neurons) removed.")
    args = parser.parse_args()
    base, tokenizer = load_minilm()
    calibration = [row["text"] for row in load_debian("train", per_section=11)][:128]
    test = [row["text"] for row in load_debian("test", per_section=40)]
    reference = embeddings(base, tokenizer, test)

    def cosine(model) -> float:
        return torch.nn.functional.cosine_similarity(embeddings(model, tokenizer, test), reference).mean().item()

    def run(config, sequential: bool = False):
        model = copy.deepcopy(base)
        if sequential:
            sequential_compress(model, config, calibration, tokenizer=tokenizer, progress=False)
        else:
            apply_compression(model, config, calibration_data=calibration, tokenizer=tokenizer)
        return model, get_recipe(model).techniques[-1]

    rows = []
    for label, cls, amount in (("heads", HeadPruningConfig, "fraction"), ("FFN", FFNPruningConfig, "fraction")):
        common = dict(ranking="per_layer", max_samples=len(calibration), **{amount: args.fraction})
        for importance in ("magnitude", "gradient", "activation"):
            for sequential in (False, True) if importance == "activation" else (False,):
                model, chosen = run(cls(importance=importance, compensate_bias=False, **common), sequential)
                values = [cosine(model)]
                if importance == "activation":
                    model, _ = run(cls(importance=importance, compensate_bias=True, **common), sequential)
                    values.append(cosine(model))
                elif label == "heads":  # the same choice, compensated: its explicit map re-applied with the means
                    model, _ = run(dataclasses.replace(chosen, importance="activation", compensate_bias=True))
                    values.append(cosine(model))
                else:  # FFN sizes alone would let the activation scores pick the neurons: not the same choice
                    values.append(float("nan"))
                how = " sequential" if sequential else " one-pass" if importance == "activation" else ""
                name = importance + how
                rows.append((label, name, *values))
                print(f"{label:5s} {name:22s} plain {values[0]:.5f}   compensated {values[1]:.5f}", flush=True)
    print(f"\nMiniLM, {args.fraction:.3g} of the units removed per layer, {len(calibration)} calibration texts, "
          f"{len(test)} test texts: mean cosine of pooled embeddings to fp32")  # fmt: skip
    print("| units | ranking | no compensation | bias compensation |\n|---|---|---|---|")
    for label, name, plain, compensated in rows:
        print(f"| {label} | {name} | {plain:.4f} | {compensated:.4f} |".replace("nan", "-"))


if __name__ == "__main__":
    main()
