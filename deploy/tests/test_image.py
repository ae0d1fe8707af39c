"""deploy/Dockerfile: lint (hadolint), and checks that tie it to the
repository: the packages and binaries it builds and copies exist in the
Cargo manifests, every workspace member is in the build context, the Rust
version is rust-toolchain.toml's, builder and runtime share a Debian
release (glibc), the runtime user is not root, and the runtime image has
every shared library the built binaries load.

No image is built here: these machines have no Docker daemon and cannot
reach the registries of the two FROM images (scripts/test says so)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import REPO
from strata.testing import stratad_binary

DOCKERFILE = REPO / "deploy" / "Dockerfile"
IGNORE = REPO / "deploy" / "Dockerfile.dockerignore"

# What gcr.io/distroless/cc-debian12 holds beyond the static base: glibc
# (libc, libm, libpthread, libdl, librt, the loader), libgcc_s, libstdc++
# and libgomp. A binary that needs more (libssl, say) needs another image.
RUNTIME_LIBS = {
    "linux-vdso.so.1", "ld-linux-x86-64.so.2", "libc.so.6", "libm.so.6", "libpthread.so.0",
    "libdl.so.2", "librt.so.1", "libgcc_s.so.1", "libstdc++.so.6", "libgomp.so.1",
}
# Debian release of each image family used, for the glibc match.
DEBIAN = {"bookworm": 12, "trixie": 13, "debian12": 12, "debian13": 13}


def workspace() -> dict:
    """Workspace members -> {package, bins}."""
    root = tomllib.loads((REPO / "Cargo.toml").read_text())
    members = {}
    for m in root["workspace"]["members"]:
        manifest = tomllib.loads((REPO / m / "Cargo.toml").read_text())
        bins = [b["name"] for b in manifest.get("bin", [])]
        if (REPO / m / "src" / "main.rs").exists() and not bins:
            bins = [manifest["package"]["name"]]
        members[m] = {"package": manifest["package"]["name"], "bins": bins}
    return members


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    out, cur = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue
        cur += " " + s[:-1] if s.endswith("\\") else " " + s
        if not s.endswith("\\"):
            word, _, rest = cur.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            cur = ""
    return out


def problems(text: str) -> list[str]:
    """Everything wrong with a Dockerfile for this repository, as sentences."""
    found = []
    ins = instructions(text)
    args = {}
    stages = []  # [{"from": image, "name": alias, "ins": [...]}]
    for word, rest in ins:
        if word == "ARG" and not stages:
            k, _, v = rest.partition("=")
            args[k] = v
        elif word == "FROM":
            image, _, alias = rest.partition(" AS ")
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), image.strip())
            stages.append({"from": image, "name": alias.strip(), "ins": []})
        elif stages:
            stages[-1]["ins"].append((word, rest))
    if len(stages) < 2:
        return ["not a multi-stage build"]
    build, final = stages[0], stages[-1]

    channel = tomllib.loads((REPO / "rust-toolchain.toml").read_text())["toolchain"]["channel"]
    m = re.fullmatch(r"rust:([0-9.]+)-slim-(\w+)", build["from"])
    if not m:
        found.append(f"builder {build['from']!r} is not rust:<version>-slim-<debian>")
    elif m.group(1) != channel:
        found.append(f"builder Rust {m.group(1)} is not rust-toolchain.toml's {channel}")
    m2 = re.fullmatch(r"gcr\.io/distroless/cc-(debian\d+)(:nonroot)?", final["from"])
    if not m2:
        found.append(f"runtime {final['from']!r} is not distroless/cc")
    elif m and DEBIAN.get(m.group(2)) != DEBIAN.get(m2.group(1)):
        found.append(f"builder ({m.group(2)}) and runtime ({m2.group(1)}) differ in glibc")

    members = workspace()
    copied = set()
    for word, rest in build["ins"]:
        if word == "COPY" and not rest.startswith("--from"):
            copied.update(shlex.split(rest)[:-1])
    for need in ["Cargo.toml", "Cargo.lock", *members]:
        if need not in copied:
            found.append(f"{need} is not copied into the builder")
    ignored = [line.strip() for line in IGNORE.read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for path in copied:
        for pat in ignored:
            if path == pat or path.startswith(pat.rstrip("/") + "/"):
                found.append(f"{path} is copied but {IGNORE.name} excludes it ({pat})")

    builds = [rest for word, rest in build["ins"] if word == "RUN" and "cargo build" in rest]
    if len(builds) != 1:
        return found + [f"{len(builds)} cargo build commands in the builder"]
    cmd = builds[0]
    for flag in ["--release", "--locked"]:
        if flag not in cmd.split():
            found.append(f"cargo build without {flag}")
    pkgs = re.findall(r"-p ([\w-]+)", cmd)
    by_package = {v["package"]: v["bins"] for v in members.values()}
    bins = set()
    for p in pkgs:
        if p not in by_package:
            found.append(f"cargo build -p {p}: no such package in the workspace")
        bins.update(by_package.get(p, []))
    built = set(re.findall(r"target/release/([\w-]+)", cmd))
    for b in built - bins:
        found.append(f"target/release/{b} is not a binary of the packages built ({sorted(bins)})")
    for b in ["stratad", "strata"]:
        if b not in built:
            found.append(f"{b} is not installed from target/release")

    from_build = [shlex.split(rest) for word, rest in final["ins"]
                  if word == "COPY" and rest.startswith(f"--from={build['name']}")]
    final_bins = {Path(src).name for c in from_build for src in c[1:-1]}
    if final_bins != {"stratad", "strata"}:
        found.append(f"the runtime image gets {sorted(final_bins)}, not stratad and strata")

    users = [rest for word, rest in final["ins"] if word == "USER"]
    if not users:
        found.append("the runtime stage sets no USER (it would run as root)")
    else:
        user = users[-1].split(":")[0]
        if not user.isdigit() or int(user) == 0:
            found.append(f"USER {users[-1]}: must be a numeric uid other than 0 (runAsNonRoot checks numbers)")
    entry = [rest for word, rest in final["ins"] if word == "ENTRYPOINT"]
    if entry != ['["/usr/local/bin/stratad"]']:
        found.append(f"ENTRYPOINT {entry} is not stratad")
    return found


def test_dockerfile_has_no_problems():
    assert problems(DOCKERFILE.read_text()) == []


MUTATIONS = [
    ("USER 65532:65532", "USER root"),
    ("USER 65532:65532", "USER 0:0"),
    ("USER 65532:65532", ""),
    ("target/release/strata\n", "target/release/strata-cli\n"),
    ("-p strata-client", "-p strata-cli"),
    ("COPY --from=build /out/stratad /out/strata", "COPY --from=build /out/stratad"),
    ("COPY kernels kernels\n", ""),
    ("ARG RUST_VERSION=1.95.0", "ARG RUST_VERSION=1.80.0"),
    ("gcr.io/distroless/cc-debian12:nonroot", "gcr.io/distroless/cc-debian13:nonroot"),
    ("--release --locked", "--release"),
]


@pytest.mark.parametrize("old,new", MUTATIONS, ids=[f"{o.strip()} -> {n.strip() or '(gone)'}" for o, n in MUTATIONS])
def test_problems_are_found_in_a_broken_dockerfile(old, new):
    text = DOCKERFILE.read_text()
    # The mutation must apply to the real file, or it tests nothing.
    assert old in text, old
    found = problems(text.replace(old, new, 1))
    assert found, f"no problem found after {old!r} -> {new!r}"
    print(found)


def hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    if exe.exists():
        return str(exe)
    found = shutil.which("hadolint")
    assert found, "hadolint not installed: run deploy/tests/setup.sh"
    return found


def test_hadolint_passes():
    r = subprocess.run([hadolint(), "--failure-threshold", "info", str(DOCKERFILE)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("old,new,rule", [
    ("USER 65532:65532", "USER root", "DL3002"),
    ("FROM gcr.io/distroless/cc-debian12:nonroot", "FROM gcr.io/distroless/cc-debian12", "DL3006"),
    ("WORKDIR /src", "RUN cd /src", "DL3003"),
])
def test_hadolint_fails_a_broken_copy(tmp_path, old, new, rule):
    text = DOCKERFILE.read_text()
    assert old in text
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace(old, new, 1))
    r = subprocess.run([hadolint(), "--failure-threshold", "info", str(broken)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and rule in r.stdout, r.stdout + r.stderr


def shared_libraries(binary: Path) -> set[str]:
    r = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=60, check=True)
    libs = set()
    for line in r.stdout.splitlines():
        name = line.split()[0]
        libs.add(Path(name).name)
    return libs


@pytest.mark.parametrize("name", ["stratad", "strata"])
def test_the_runtime_image_has_every_library_the_binaries_load(name):
    binary = stratad_binary().parent / name
    assert binary.exists(), f"{binary}: build it first (cargo build --bins)"
    libs = shared_libraries(binary)
    assert "libc.so.6" in libs
    assert libs <= RUNTIME_LIBS, f"{name} loads {sorted(libs - RUNTIME_LIBS)}, not in distroless/cc"

