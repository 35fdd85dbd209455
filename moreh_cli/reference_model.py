"""get-reference-model: copy a reference training script, verified on the platform, with its data.

    get-reference-model                 list the reference models
    get-reference-model NAME [DIR]      copy model NAME into DIR (default: ./NAME)

A reference model is an ordinary single-GPU PyTorch program (``device="cuda"``) and its sample
data: ``python train.py`` in the copied directory trains it on the current device.
"""
from __future__ import annotations

import argparse
import ast
import shutil
import sys
from pathlib import Path

from moreh_cli import common

ENTRY_POINT = "train.py"
# A source checkout keeps them in examples/; an installed platform under <prefix>/share/moai.
SEARCH_PATH = (Path(__file__).resolve().parents[1] / "examples",
               Path(sys.prefix) / "share" / "moai" / "examples")
SKIPPED = shutil.ignore_patterns("__pycache__", "*.pyc")


def models_dir() -> Path:
    for candidate in SEARCH_PATH:
        if candidate.is_dir():
            return candidate
    raise common.ToolError("the reference models are not installed here (looked in "
                           f"{', '.join(map(str, SEARCH_PATH))}); run `update-moreh --force`")


def available() -> dict[str, Path]:
    return {d.name: d for d in sorted(models_dir().iterdir()) if (d / ENTRY_POINT).is_file()}


def summary(model: Path) -> str:
    doc = ast.get_docstring(ast.parse((model / ENTRY_POINT).read_text())) or ""
    return doc.splitlines()[0] if doc else ""


def list_models():
    models = available()
    width = max(map(len, models), default=0)
    print("Reference models (get one with `get-reference-model NAME [DIR]`):")
    for name, path in models.items():
        print(f"  {name:<{width}}  {summary(path)}")


def fetch(name: str, target: Path | None, force: bool):
    models = available()
    if name not in models:
        raise common.ToolError(f"no reference model {name!r}; available: {', '.join(models)}")
    target = (target or Path(name)).resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise common.ToolError(f"{target} already exists and is not empty; choose another "
                               "directory or add --force to overwrite its files")
    shutil.copytree(models[name], target, ignore=SKIPPED, dirs_exist_ok=True)
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    print(f"Copied reference model {name} to {target}: {', '.join(files)}")
    print(f"Train it with:  cd {target} && python {ENTRY_POINT}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="get-reference-model", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:4]))
    parser.add_argument("name", nargs="?", help="the reference model to copy (omit to list them)")
    parser.add_argument("dir", nargs="?", type=Path, help="where to put it (default: ./NAME)")
    parser.add_argument("--force", action="store_true", help="overwrite files in a non-empty DIR")
    args = parser.parse_args(argv)
    if args.name is None:
        return common.run_tool("get-reference-model", list_models)
    return common.run_tool("get-reference-model", lambda: fetch(args.name, args.dir, args.force))


if __name__ == "__main__":
    sys.exit(main())
