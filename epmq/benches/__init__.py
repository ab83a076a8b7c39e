"""Benches built from an experiment's YAML: real checkpoints and data for ``epmq.pipeline.run``.

    import yaml
    from epmq.benches import build_bench
    config = yaml.safe_load(open("configs/clip-vit-b32-8tasks.yaml"))
    bench = build_bench(config, base_dir="configs")
    bench.evaluate(bench.base_state, split="val")      # {task: acc, ..., "avg": acc}

Families (``model.family``):

==========  =========================================================  =========================
family      merged and quantized model                                 bench class
==========  =========================================================  =========================
hf_clip     ``CLIPVisionModel`` of an HF ``CLIPModel``; frozen           ``clip.HFClipBench``
            zero-shot text heads
open_clip   the visual tower of an open_clip CLIP; frozen text heads    ``open_clip_bench.OpenClipBench``
hf_t5       the whole ``T5ForConditionalGeneration`` (GLUE, text to     ``t5_glue.T5GlueBench``
            text)
hf_causal_  the whole ``AutoModelForCausalLM`` (the same text tasks,    ``causal_lm.CausalLMBench``
lm          answers scored as continuations of the prompt)
==========  =========================================================  =========================

The schema of the ``model``, ``tasks``, ``data`` and ``eval`` sections is in ``config.py``;
``build_bench`` ignores the other top-level sections (``merge``, ``quantize``, ``output``).
Every bench follows the protocol of ``epmq.pipeline`` (task_names, base_state, lazy experts,
model(state), calibration, evaluate, expert_accuracies). Bad configurations, missing files,
hub ids that cannot be fetched and missing data splits raise ``BenchConfigError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Optional, Union

from .config import FAMILIES, BenchConfig, BenchConfigError, parse_config

__all__ = ["build_bench", "load_config", "parse_config", "example_configs", "BenchConfig", "BenchConfigError",
           "FAMILIES"]

EXAMPLE_CONFIG = "clip-vit-b32-8tasks.yaml"  # (a file every copy of the examples holds)


def example_configs() -> Optional[Path]:
    """The directory of epmq's example configs (the repository's ``configs/``): the copy
    installed with the package (``epmq/configs``), else a source checkout's; None if neither."""
    package = Path(__file__).resolve().parents[1]
    for directory in (package / "configs", package.parent / "configs"):
        if (directory / EXAMPLE_CONFIG).is_file() and (directory / "files").is_dir():
            return directory
    return None


def _bench_class(family: str):
    if family == "hf_clip":
        from .clip import HFClipBench

        return HFClipBench
    if family == "open_clip":
        from .open_clip_bench import OpenClipBench

        return OpenClipBench
    if family == "hf_t5":
        from .t5_glue import T5GlueBench

        return T5GlueBench
    if family == "hf_causal_lm":
        from .causal_lm import CausalLMBench

        return CausalLMBench
    raise BenchConfigError(f"unknown model family {family!r}: one of {', '.join(FAMILIES)}")


def build_bench(config: Union[Mapping, BenchConfig], *, base_dir=".", progress: Union[bool, Callable] = True):
    """The bench of ``config`` (the YAML as a dict, or a parsed ``BenchConfig``).

    ``base_dir``: what relative paths in the config are relative to (the YAML's directory).
    ``progress``: True logs what is loaded to stderr, False is silent, a callable gets the lines.
    """
    from .._util import loading_bars
    from .common import make_log

    if not isinstance(config, BenchConfig):
        config = parse_config(config, base_dir=base_dir)
    with loading_bars(progress is True):  # (transformers' bars as the bench loads its models)
        bench = _bench_class(config.model.family)(config, make_log(progress))
    bench.progress = progress is True  # (bars on stderr for evaluations; a callable gets lines only)
    return bench


def load_config(path, expected: str = "a mapping with model, tasks, ... sections") -> dict:
    """The YAML file at ``path`` as a dict (``BenchConfigError`` if missing, not YAML, or not
    ``expected``: a mapping)."""
    import yaml

    path = Path(path)
    if path.is_dir():  # (not "not found": it is there, as a directory)
        raise BenchConfigError(f"{path} is a directory, not a config file: give the YAML file in it")
    if not path.is_file():
        # (`epmq --help` and the README name the examples as configs/...: from an installed
        # epmq, run elsewhere than a checkout, say where that file is)
        examples = example_configs()
        shipped = (examples / Path(*path.parts[1:]) if examples is not None and not path.is_absolute()
                   and len(path.parts) > 1 and path.parts[0] == "configs" else None)
        hint = f" (epmq's example of that name is installed as {shipped})" if shipped and shipped.is_file() else ""
        raise BenchConfigError(f"config file not found: {path}{hint}")
    class Loader(yaml.SafeLoader):
        """YAML's safe loader, but a key given twice in one mapping is an error (YAML keeps the
        last silently: ``bits: 3`` then ``bits: 4`` quantized at 4 bits). Checked as each mapping
        is read, before "<<" merges splice other keys in (which a mapping may override)."""

        def compose_mapping_node(self, anchor):
            node = super().compose_mapping_node(anchor)
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag not in ("tag:yaml.org,2002:str", "tag:yaml.org,2002:merge"):
                    # (every key epmq reads is a name: YAML 1.1 reads an unquoted yes/no/on/off
                    # key as a bool, 1 as an int, 2024-12-05 as a date; unchecked, the unknown-key
                    # messages failed sorting them among strings with a bare TypeError)
                    kind = key_node.tag.rpartition(":")[2]
                    shown = f"key {key_node.value!r}" if isinstance(key_node, yaml.ScalarNode) else f"{kind} key"
                    raise BenchConfigError(f"{path}: the {shown} (line {key_node.start_mark.line + 1}) is not "
                                           f"a name: YAML reads it as {kind}, not a string; quote it")
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = (key_node.tag, key_node.value)
                    if key in seen:
                        raise BenchConfigError(f"{path}: {key_node.value!r} is given twice in one mapping "
                                               f"(line {key_node.start_mark.line + 1})")
                    seen.add(key)
            return node

    try:
        # (UTF-8 whatever the locale, as YAML is; a file saved in another encoding, or one that
        # cannot be read, is named rather than ended in a traceback)
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BenchConfigError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}): save it as UTF-8") from e
    except OSError as e:
        raise BenchConfigError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        data = yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        raise BenchConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise BenchConfigError(f"{path} must hold {expected}")
    return data
