"""ik_llama.cpp (the llama.cpp fork with its own CPU kernels) as the second benchmark peer: its
`llama-server`, built once from the PyPI sdist `ik-llama-cpp-python` (its full source is under
vendor/ik_llama.cpp) into a cache. A peer to measure against, never a dependency of gemlora; the cache
key, the download and the cmake build are bench/llama_cpp.py's.

    python bench/ik_llama_cpp.py         # build (about 15 minutes on 2 cores) and print the binary's path

The sdist lacks common/cmake/build-info-gen-cpp.cmake, the script common/CMakeLists.txt runs to make
build-info.cpp, so a stand-in is written that fills common/build-info.cpp.in with fixed values (build 0,
commit "ik-llama-cpp-python-<version>"). The build is Release with GGML_NATIVE=ON, the server on, curl,
SSL and tests off (the server is one of the examples: they are configured, only llama-server is built),
keyed by the sdist version, this CPU's flags and GEMLORA_LLAMA_CFLAGS (honoured as bench/llama_cpp.py
does) under ~/.cache/gemlora/ik_llama.cpp (GEMLORA_CACHE moves it).

bench/serving.py runs it with `-rtr -no-fa`: -rtr (its --help lists only --run-time-repack) repacks the
weights for its CPU kernels at load; -no-fa (--no-flash-attn) because its flash attention, on by
default, aborts with 32 slots on GGML_ASSERT(S > 0) in iqk_fa_templates.h. Its web UI is off with
`--webui none` (it has no --no-webui).
"""

from __future__ import annotations

import platform
from pathlib import Path

from llama_cpp import build_key, build_server, cache_root, fetch_sdist

VERSION = "0.1.5"
INDEX = "https://pypi.org/simple/ik-llama-cpp-python/"
PEER = "ik_llama.cpp"

BUILD_INFO_GEN = """\
# A stand-in written by gemlora's bench/ik_llama_cpp.py: the sdist ships common/build-info.cpp.in
# without the script that fills it. Run with -P from the source root, as common/CMakeLists.txt does.
set(BUILD_NUMBER 0)
set(BUILD_COMMIT "ik-llama-cpp-python-{version}")
set(BUILD_COMPILER "${{CMAKE_C_COMPILER_ID}} ${{CMAKE_C_COMPILER_VERSION}}")
set(BUILD_TARGET "{target}")
configure_file("${{CMAKE_CURRENT_LIST_DIR}}/../build-info.cpp.in" "${{CMAKE_CURRENT_LIST_DIR}}/../build-info.cpp" @ONLY)
"""


def source_dir() -> Path:
    """The sdist, downloaded and unpacked once; its vendor/ik_llama.cpp/ folder, with the build-info stand-in."""
    root = cache_root(PEER) / f"src-{VERSION}"
    src = root / f"ik_llama_cpp_python-{VERSION}" / "vendor" / "ik_llama.cpp"
    if not (src / "CMakeLists.txt").is_file():
        fetch_sdist(INDEX, f"ik_llama_cpp_python-{VERSION}.tar.gz", root)
    gen = src / "common" / "cmake" / "build-info-gen-cpp.cmake"
    if not gen.is_file():
        gen.parent.mkdir(exist_ok=True)
        target = f"{platform.machine()}-{platform.system().lower()}"
        gen.write_text(BUILD_INFO_GEN.format(version=VERSION, target=target))
    return src


def llama_server() -> Path:
    """ik_llama.cpp's llama-server binary for this CPU, built on first use."""
    return build_server(source_dir, cache_root(PEER) / f"build-{VERSION}-{build_key()}", [
        "-DLLAMA_CURL=OFF", "-DLLAMA_SERVER_SSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=ON",
        "-DLLAMA_BUILD_SERVER=ON"])


if __name__ == "__main__":
    print(llama_server())
