"""A vLLM-compatible copy of the shipped toy model, and the scripts' default runs on it.

vLLM's CPU attention supports head sizes 32, 64, 80, 96, 112, 128, 160, ...; the toy has 4 heads of 40. The copy
has 2 heads of 80: every weight has the same shape and values (so HF loads the same tensors), but attention splits
them differently, so it is a different model from the toy, and the README's figures (measured on the toy) do not
apply to it. The real-vLLM tests and the sampler benchmarks use it; the toy itself stays as shipped.

    python tests/vllm_toy.py DIR                              # write the copy into DIR
    python tests/vllm_toy.py DIR sera.py --sampler vllm ...   # write it, then run sera.py's toy preset on it
"""

import json
import shutil
import sys
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]
TOY_MODEL = ROOT / "assets" / "toy" / "model"


def reheaded_toy(directory: Path) -> Path:
    """The toy model with half the attention heads, each twice as wide (head_dim 40 -> 80), in `directory`."""
    directory = Path(directory)
    shutil.copytree(TOY_MODEL, directory, dirs_exist_ok=True)
    config = json.loads((TOY_MODEL / "config.json").read_text())
    config.update(
        num_attention_heads=config["num_attention_heads"] // 2,
        num_key_value_heads=config["num_key_value_heads"] // 2,
        head_dim=config["head_dim"] * 2,
    )
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


if __name__ == "__main__":
    model = reheaded_toy(Path(sys.argv[1]))
    if len(sys.argv) > 2:  # the script's "toy" preset, with this model; vLLM's processes import nothing from here
        script, sys.argv = sys.argv[2], [sys.argv[2]] + sys.argv[3:]
        sys.path.insert(0, str(ROOT))
        module = __import__(Path(script).stem)
        module.MODELS["toy"]["path"] = str(model)
        try:
            module.main(tyro.cli(module.Args))
        except module.InputError as err:
            sys.exit(f"{script}: error: {err}")
