@echo off
rem Set up hierarchos in the current Python environment (a venv is recommended).
rem   setup.bat            install hierarchos and its dependencies (editable)
rem   setup.bat --test     also install the test dependencies (pytest, hypothesis)
rem   setup.bat --vulkan   also build the Vulkan backend (chat --device vulkan for quantized models);
rem                        needs the LunarG Vulkan SDK (headers and glslc, found through %VULKAN_SDK%)
rem   setup.bat --require-kernel   fail when the C++ kernel cannot be built
rem The C++ kernel (kernels\) is built in place when cmake and MSVC (or another C++ compiler)
rem are present; without them hierarchos runs quantized models on a slow numpy reference.
rem Safe to run again. Uses %PYTHON% if set, else `python`.
rem torch: an importable torch is kept as it is (CUDA users: install your CUDA build of torch
rem first); otherwise %TORCH_SPEC% (default torch==2.13.0) is installed before everything else.
setlocal EnableExtensions
cd /d "%~dp0"

set "WITH_TEST=0"
set "WITH_VULKAN=0"
set "REQUIRE_KERNEL=0"
:parse
if "%~1"=="" goto parsed
if /i "%~1"=="--test" (set "WITH_TEST=1" & shift & goto parse)
if /i "%~1"=="--vulkan" (set "WITH_VULKAN=1" & shift & goto parse)
if /i "%~1"=="--require-kernel" (set "REQUIRE_KERNEL=1" & shift & goto parse)
if /i "%~1"=="--help" goto usage
if /i "%~1"=="-h" goto usage
echo setup.bat: unknown option '%~1' (known: --test, --vulkan, --require-kernel, --help) 1>&2
exit /b 2
:usage
echo usage: setup.bat [--test] [--vulkan] [--require-kernel]
exit /b 0
:parsed

if not defined PYTHON set "PYTHON=python"
"%PYTHON%" -c "import sys; sys.exit(sys.version_info < (3, 10))" >nul 2>&1
if errorlevel 1 (
  echo setup.bat: hierarchos needs Python 3.10 or newer as "%PYTHON%" 1>&2
  exit /b 1
)
set "PIP=%PYTHON% -m pip install -q --disable-pip-version-check"
"%PYTHON%" -c "import sys; print('python:', sys.executable, sys.version.split()[0])"

rem ---- torch (first, so the rest sees it satisfied) -----------------------------
if not defined TORCH_SPEC set "TORCH_SPEC=torch==2.13.0"
"%PYTHON%" -c "import torch" >nul 2>&1
if errorlevel 1 (
  echo torch: not found, installing %TORCH_SPEC%
  %PIP% "%TORCH_SPEC%" || exit /b 1
)
"%PYTHON%" -c "import torch; print('torch:', torch.__version__, '(CUDA ' + torch.version.cuda + ')' if torch.version.cuda else '(CPU build)')" || exit /b 1

rem ---- hierarchos and its Python dependencies -----------------------------------
set "TARGET=."
if "%WITH_TEST%"=="1" set "TARGET=.[test]"
echo hierarchos: pip install -e %TARGET%
%PIP% -e "%TARGET%" || exit /b 1

rem ---- C++ kernel (kernels\) ----------------------------------------------------
rem pybind11 + CMake extension, copied to hierarchos\hierarchos_kernels*.pyd for the editable
rem install. A failed build is a warning (numpy reference fallback) unless --require-kernel.
%PIP% "pybind11>=2.12" || echo kernel: could not install pybind11 from PyPI
set "BUILD_ARGS="
if "%WITH_VULKAN%"=="1" (
  set "BUILD_ARGS=--vulkan"
  if not defined VULKAN_SDK echo vulkan: VULKAN_SDK is not set; install the LunarG Vulkan SDK ^(https://vulkan.lunarg.com^), which provides the headers and glslc, and open a new terminal 1>&2
)
if "%REQUIRE_KERNEL%"=="1" (
  "%PYTHON%" kernels\build.py --require %BUILD_ARGS% || exit /b 1
) else (
  "%PYTHON%" kernels\build.py %BUILD_ARGS%
  if "%WITH_VULKAN%"=="1" if errorlevel 1 exit /b 1
)

echo done. Try: %PYTHON% hierarchos_cli.py train --tiny --epochs 1 --out-dir runs\tiny  (then: demo --model-path runs\tiny)
endlocal
