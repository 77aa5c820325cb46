# Sourced by the scripts/device_*.sh that run pipeinfer-cpu on the lent machine (no network there).
# install_site CARRIED SITE: the carried wheels (CARRIED/whl/), llama-cpp-python's Python files
# (CARRIED/llama_cpp_py/, lib/ with the libraries as the Makefile builds them) and the CPU backend
# variants (CARRIED/bin/) into SITE, the folder PYTHONPATH then names.
install_site() {
  local carried=$1 site=$2
  mkdir -p "$site"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$carried"/whl/*.whl
  rm -rf "$site/llama_cpp" "$site/bin"
  cp -r "$carried/llama_cpp_py" "$site/llama_cpp" && cp -r "$carried/bin" "$site/bin"
  (cd "$site/llama_cpp/lib" && for f in *.so.0; do ln -sf "$f" "${f%.0}"; done)
}
