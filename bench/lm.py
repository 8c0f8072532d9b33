"""Small causal language models trained on the Debian package descriptions, to judge decoder compression by.

Two families, built from configs (nothing is downloaded): a GPT-2-style model (learned positions, `Conv1D`
projections, GELU MLP) and a Llama-style one (RoPE, SwiGLU, grouped-query attention with 2 key/value heads for 8
query heads). Both share a byte-level BPE tokenizer trained on the *train* split only; perplexity is measured on
the *test* split, which never overlaps it (the dataset's split field is fixed, see ../shared/data/README.md).

Why a BPE of our own rather than MiniLM's WordPiece: MiniLM's vocabulary has 30,522 lower-cased tokens, so at
hidden 256 its embedding alone (7.8M parameters) would be 2.5x the transformer body and the table would mostly
measure the embedding; its uncased pieces also throw away the case information a language model should predict.
A 4,096-token byte-level BPE covers every byte (no unknown tokens), trains in seconds and keeps the linear layers
(what quantization and GPTQ act on) the bulk of the model.

Trained weights and the tokenizer are cached under ``$HF_COMPRESS_BENCH_CACHE/perplexity`` (default
``~/.cache/hf_compress/bench``), in a folder keyed by a hash of the model config, the training settings, the data
file and the seed, so re-runs skip training. A folder holds a plain ``save_pretrained`` checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bench.harness import cache_dir
from hf_compress.data import debian_dataset_path, load_debian


__all__ = ["LMSpec", "SPECS", "QUICK_SPECS", "train_or_load", "debian_texts", "log_probs", "kl_to_reference", "token_stream", "windows", "perplexity"]

EOS = "<|endoftext|>"
PAD = "<pad>"


@dataclass(frozen=True)
class LMSpec:
    """One model to train: family, shape and training settings (all part of the cache key)."""

    family: str  # "gpt2" or "llama"
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 2  # llama only (grouped-query attention)
    intermediate: int = 768  # llama only; gpt2 uses 4 * hidden
    vocab: int = 4096
    seq: int = 128
    steps: int = 400
    batch: int = 16
    lr: float = 2e-3
    seed: int = 0
    max_train_texts: int | None = None

    @property
    def name(self) -> str:
        attn = f"{self.heads}q/{self.kv_heads}kv heads" if self.family == "llama" else f"{self.heads} heads"
        return f"{self.family}-style ({self.layers}x{self.hidden}, {attn})"


SPECS = (LMSpec("gpt2"), LMSpec("llama"))
QUICK_SPECS = (
    LMSpec("gpt2", hidden=64, layers=2, heads=4, vocab=512, seq=64, steps=60, batch=8, lr=3e-3, max_train_texts=600),
    LMSpec("llama", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, seq=64, steps=60, batch=8,
           lr=3e-3, max_train_texts=600),
)  # fmt: skip


def debian_texts(split: str, limit: int | None = None) -> list[str]:
    """The texts of one split of the Debian descriptions (in file order), at most `limit`.

    The test split leaves out the few descriptions that also occur word for word in the train split (7 of 1,382:
    different packages sharing one text), so no held-out text was seen in training.
    """
    texts = [row["text"] for row in load_debian(split)]
    if split == "test":
        seen = {row["text"] for row in load_debian("train")}
        texts = [text for text in texts if text not in seen]
    return texts[:limit]


def _key(spec: LMSpec) -> str:
    data = debian_dataset_path()
    blob = json.dumps({"spec": asdict(spec), "data": [data.name, data.stat().st_size], "v": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_tokenizer(texts: list[str], vocab: int) -> Any:
    """A byte-level BPE (`tokenizers`) trained on `texts`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   model_max_length=1 << 30)  # fmt: skip


def build_model(spec: LMSpec, tokenizer: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)  # fmt: skip
    if spec.family == "gpt2":
        config = GPT2Config(n_embd=spec.hidden, n_layer=spec.layers, n_head=spec.heads, n_positions=spec.seq,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)  # fmt: skip
    elif spec.family == "llama":
        config = LlamaConfig(hidden_size=spec.hidden, num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                             num_key_value_heads=spec.kv_heads, intermediate_size=spec.intermediate,
                             max_position_embeddings=spec.seq, **ids)  # fmt: skip
    else:
        raise ValueError(f"family must be 'gpt2' or 'llama', got {spec.family!r}.")
    torch.manual_seed(spec.seed)
    return AutoModelForCausalLM.from_config(config)


def token_stream(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """All `texts` tokenized, each followed by the end-of-text token, as one 1-D stream."""
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[n, seq]`` windows of a token stream (the tail shorter than `seq` is dropped).

    With `limit`, that many windows evenly spaced over the whole stream (the file is grouped by section, so the
    first windows alone would all be one section).
    """
    n = stream.numel() // seq
    data = stream[: n * seq].view(n, seq)
    if limit is None or limit >= n:
        return data
    return data[torch.linspace(0, n - 1, limit).round().long()]


def train_or_load(spec: LMSpec, root: Path | None = None, progress: bool = True) -> tuple[Path, dict]:
    """The checkpoint folder of `spec` (trained now unless cached) and its training record."""
    folder = (root or cache_dir() / "perplexity") / f"{spec.family}-{_key(spec)}"
    record_path = folder / "training.json"
    if record_path.is_file():
        return folder, json.loads(record_path.read_text())
    train_texts = debian_texts("train", spec.max_train_texts)
    start = time.perf_counter()
    tokenizer = train_tokenizer(train_texts, spec.vocab)
    data = windows(token_stream(tokenizer, train_texts), spec.seq)
    model = build_model(spec, tokenizer).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, spec.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / spec.steps))))  # fmt: skip
    generator = torch.Generator().manual_seed(spec.seed)
    epochs = -(-spec.steps * spec.batch // len(data))  # a fresh order every epoch
    order = torch.cat([torch.randperm(len(data), generator=generator) for _ in range(epochs)])
    bar = tqdm(range(spec.steps), desc=f"training {spec.name}", disable=not progress)
    losses = []
    for step in bar:
        batch = data[order[step * spec.batch : (step + 1) * spec.batch]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    seconds = time.perf_counter() - start
    folder.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    record = {"spec": asdict(spec), "train_seconds": seconds, "train_tokens": int(spec.steps * spec.batch * spec.seq),
              "train_windows": len(data), "final_loss": sum(losses[-20:]) / len(losses[-20:]),
              "threads": torch.get_num_threads()}  # fmt: skip
    record_path.write_text(json.dumps(record, indent=2))  # written last: a folder without it is retrained
    return folder, record


@torch.inference_mode()
def log_probs(model: torch.nn.Module, data: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Float32 next-token log-probabilities ``[windows, seq - 1, vocab]`` of `model` on the `data` windows."""
    out = [model(input_ids=data[s : s + batch]).logits[:, :-1].float().log_softmax(-1) for s in range(0, len(data), batch)]
    return torch.cat(out)


@torch.inference_mode()
def kl_to_reference(model: torch.nn.Module, data: torch.Tensor, reference: torch.Tensor, batch: int = 16) -> float:
    """Mean over positions of KL(reference || model) in nats, `reference` from `log_probs` on the same `data`."""
    total = 0.0
    for start in range(0, len(data), batch):
        logq = model(input_ids=data[start : start + batch]).logits[:, :-1].float().log_softmax(-1)
        logp = reference[start : start + batch]
        total += (logp.exp() * (logp - logq)).sum().item()
    return total / (reference.shape[0] * reference.shape[1])


@torch.inference_mode()
def perplexity(model: torch.nn.Module, data: torch.Tensor, batch: int = 16, progress: bool = False) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted position of the `data` windows."""
    total, count = 0.0, 0
    for start in tqdm(range(0, len(data), batch), desc="perplexity", disable=not progress, leave=False):
        ids = data[start : start + batch]
        logits = model(input_ids=ids).logits[:, :-1].float()
        target = ids[:, 1:]
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                   reduction="sum").item()  # fmt: skip
        count += target.numel()
    return math.exp(total / count)
