"""Installs what the QLoRA kernel needs on top of Kaggle's GPU image, from the helper dataset this file is in
(`make kaggle-dataset` puts it there; the kernel's install cell runs it). Standard library only: it runs before
anything is installed.

* Only the packages requirements-kaggle.txt names may change. Every other installed package is held at the
  version this interpreter has, through a pip constraints file made from its own package list, so pip stops with
  an error rather than replace torch, pyarrow or the Jupyter machinery (ipykernel, jupyter-client, tornado,
  nbformat, papermill) under the running kernel. A requirements file that names one of those is refused.
* Offline when it can: if the dataset holds a wheel for every pinned requirement (`make kaggle-dataset WHEELS=1`),
  pip reads the dataset alone (--no-index --find-links); otherwise it downloads from PyPI (Settings > Internet).

Run by hand: ``python kaggle_install.py [--dataset DIR] [--dry-run REPORT.json]``.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REQUIREMENTS = "requirements-kaggle.txt"
PACKAGE = "qlora-helpers"
MODULE = "qlora_helpers"
# Never installed by the kernel, whatever a requirements file says: the running kernel and CUDA stack.
PROTECTED = ("torch", "torchvision", "torchaudio", "triton", "ipykernel", "ipython", "jupyter-client",
             "jupyter-core", "tornado", "traitlets", "pyzmq", "nbformat", "nbclient", "nbconvert", "papermill",
             "pyarrow", "numpy", "datasets")
NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(path: Path) -> dict[str, str]:
    """The requirement lines of ``path`` by normalized name: {name: specifier}, e.g. {'peft': '==0.21.0'}."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = NAME.match(line)
        if not match or line.startswith("-"):
            raise SystemExit(f"{path}: cannot read the line {line!r} (one 'name==version' or 'name>=version' a line)")
        out[normalize(match.group(1))] = match.group(3).split(";")[0].strip()
    return out


def pins(reqs: dict[str, str]) -> dict[str, str]:
    return {name: spec[2:].strip() for name, spec in reqs.items() if spec.startswith("==")}


def installed() -> dict[str, str]:
    """{normalized name: version} of every installed distribution, the one first on sys.path winning."""
    out: dict[str, str] = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name and normalize(name) not in out and dist.version:
            out[normalize(name)] = dist.version
    return out


def _valid(version: str) -> bool:
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return bool(re.fullmatch(r"[0-9][0-9A-Za-z.+!_-]*", version))
    try:
        Version(version)
        return True
    except InvalidVersion:
        return False


def constraints(have: dict[str, str], free: set[str]) -> list[str]:
    """``name==version`` for every installed package but those ``free`` to change."""
    return [f"{name}=={version}" for name, version in sorted(have.items()) if name not in free and _valid(version)]


def wheels_for(folder: Path, wanted: dict[str, str]) -> dict[str, Path | None]:
    """The wheel in ``folder`` for each pinned requirement (None where there is none)."""
    found = {}
    for name, version in wanted.items():
        stem = f"{re.sub(r'[-_.]+', '_', name)}-{version}-".lower()
        found[name] = next((w for w in sorted(folder.glob("*.whl")) if w.name.lower().startswith(stem)), None)
    return found


def image_identity() -> str:
    parts = []
    for name in ("git_commit", "build_date"):
        path = Path("/etc") / name
        if path.is_file():
            parts.append(f"{name} {path.read_text().strip()}")
    return "Kaggle image " + ", ".join(parts) if parts else "not a Kaggle image (no /etc/git_commit)"


def run_pip(args: list[str]) -> None:
    """pip in this interpreter, its output shown here (a notebook cell does not show a child's own output)."""
    cmd = [sys.executable, "-m", "pip", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print(line, end="", flush=True)
    if proc.wait():
        raise SystemExit(f"pip exited with status {proc.returncode} (its output is above). Without the internet, "
                         "attach a helper dataset built with its wheels (make kaggle-dataset WHEELS=1) or turn on "
                         "Settings > Internet; then run this cell again.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kaggle_install.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=Path(__file__).resolve().parent,
                        help="the helper dataset's folder (default: the one this file is in)")
    parser.add_argument("--dry-run", metavar="REPORT.json", default="",
                        help="install nothing; write pip's report of what it would install")
    parser.add_argument("--use-index", action="store_true", help="install from PyPI alone, whatever wheels the dataset holds")
    parser.add_argument("--expect-version", default="", help="the qlora_helpers version the kernel was built for")
    args = parser.parse_args(argv)

    folder = args.dataset
    reqs = requirements(folder / REQUIREMENTS)
    refused = sorted(set(reqs) & set(PROTECTED))
    if refused:
        raise SystemExit(f"{folder / REQUIREMENTS} names {', '.join(refused)}: the kernel uses the image's own "
                         "(a new torch or Jupyter package under a running kernel breaks it); remove the line")
    package = sorted(folder.glob("qlora_helpers-*.whl"))
    if not package:
        raise SystemExit(f"{folder}: no qlora_helpers-*.whl; rebuild the dataset with make kaggle-dataset")
    version = package[-1].name.split("-")[1]
    if args.expect_version and version != args.expect_version:
        raise SystemExit(f"the attached helper dataset holds qlora_helpers {version}, this kernel was built for "
                         f"{args.expect_version}: attach the matching dataset version (or rebuild it with "
                         "make kaggle-dataset and upload it with kaggle datasets version)")
    before = installed()
    # Its metadata can be visible while the package itself is not importable from this interpreter (an
    # editable install made for another environment): then it counts as missing and is installed here.
    unimportable = normalize(PACKAGE) in before and importlib.util.find_spec(MODULE) is None
    if unimportable:
        del before[normalize(PACKAGE)]
    wheels = wheels_for(folder, pins(reqs))
    offline = all(wheels.values()) and not args.use_index
    print(f"[qlora] {image_identity()}; Python {sys.version.split()[0]}; torch {before.get('torch', 'not installed')}")

    free = set(reqs) | {normalize(PACKAGE)}
    wanted = {**reqs, normalize(PACKAGE): f"=={version}"}
    todo = {name: spec for name, spec in wanted.items() if not satisfied(before.get(name), spec)}
    if not todo:
        print(f"[qlora] nothing to install: every requirement and qlora_helpers {version} are here already")
        if args.dry_run:
            Path(args.dry_run).write_text(json.dumps({"install": []}))
        return 0
    busy = sorted(m for name in todo for m in _modules(name) if m in sys.modules)
    if busy and not args.dry_run:
        raise SystemExit(f"{', '.join(busy)}: already imported in this kernel, so the new version would not be used: "
                         "restart the kernel (Run > Restart) and run the notebook from the top")
    print("[qlora] to install: " + "; ".join(f"{n}{s} (now {before.get(n) or 'not installed'})" for n, s in todo.items()))
    print(f"[qlora] from {'the dataset alone (offline)' if offline else 'PyPI'}; every other package is held at "
          "the version installed")

    with tempfile.TemporaryDirectory() as tmp:
        held = Path(tmp) / "image-constraints.txt"
        held.write_text("\n".join(constraints(before, free)) + "\n")
        pip = ["install", "--disable-pip-version-check", "--no-input", "--root-user-action=ignore", "-q",
               "-c", str(held), "-r", str(folder / REQUIREMENTS), str(package[-1])]
        if offline:
            pip += ["--no-index", "--find-links", str(folder)]
        elif not args.use_index:
            pip += ["--find-links", str(folder)]  # the wheels the dataset has, PyPI for the rest
        if args.dry_run:
            pip += ["--dry-run", "--report", str(args.dry_run)]
        run_pip(pip)
        if unimportable and not args.dry_run:  # pip took the visible metadata for an installed copy
            run_pip(pip[:5] + ["--no-deps", "--ignore-installed", str(package[-1])])
    if args.dry_run:
        plan = json.loads(Path(args.dry_run).read_text())["install"]
        print("[qlora] would install: " + (", ".join(f"{i['metadata']['name']} {i['metadata']['version']}"
                                                    for i in plan) or "nothing"))
        return 0
    return check(before, installed(), free, pins(reqs))


def satisfied(version: str | None, spec: str) -> bool:
    """Whether an installed ``version`` meets ``spec`` (``==1.2``, ``>=1.0``, or empty for any)."""
    if version is None:
        return False
    if not spec:
        return True
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:
        return spec == f"=={version}" or not spec.startswith("==")
    return SpecifierSet(spec).contains(version, prereleases=True)


def _modules(dist_name: str) -> list[str]:
    """The top-level modules a distribution provides (``packages_distributions`` inverted)."""
    return [module for module, dists in md.packages_distributions().items()
            if any(normalize(d) == dist_name for d in dists)]


def check(before: dict[str, str], after: dict[str, str], free: set[str], wanted: dict[str, str]) -> int:
    """After pip: the pinned versions are there and nothing outside ``free`` changed."""
    moved = {n: (before.get(n), after.get(n)) for n in set(before) | set(after)
             if n not in free and before.get(n) != after.get(n)}
    if moved:
        raise SystemExit("the install changed packages it must not: " + "; ".join(
            f"{n} {a} -> {b}" for n, (a, b) in sorted(moved.items())))
    wrong = {n: after.get(n) for n, v in wanted.items() if after.get(n) != v}
    if wrong:
        raise SystemExit("not installed as pinned: " + "; ".join(f"{n} {v} (wants {wanted[n]})" for n, v in wrong.items()))
    changed = {n: (before.get(n), after.get(n)) for n in free if before.get(n) != after.get(n)}
    print("[qlora] installed: " + ("; ".join(f"{n} {a or '-'} -> {b}" for n, (a, b) in sorted(changed.items()))
                                  or "nothing new (everything was there already)"))
    where = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('qlora_helpers').origin)"],
                           capture_output=True, text=True).stdout.strip()
    print(f"[qlora] qlora_helpers {after.get(normalize(PACKAGE))} is at {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
