# Shared by the setup scripts (sourced, not run): the steps every venv of this project takes.
# Each script sets VENV (the venv's folder) and PY (the interpreter to create it with) first.
#
# Every venv gets the CPU build of torch pinned (torch==2.13.0: an unpinned torch pulls a
# multi-GB CUDA build). Engine wheels (vLLM, SGLang) pin a CUDA torch and GPU-only packages, so
# their scripts install them with --no-deps and then only what their import path needs.

# pip install into $VENV, quiet. pip's resolver then lists every requirement a --no-deps install
# left out ("<package> X.Y requires ...", "ERROR: pip's dependency resolver ..."): expected, so
# dropped; whether the venv works is what each script's import check decides, not pip's exit code.
pipi() {
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 \
    | grep -v -e "^WARNING: Location" -e "^[A-Za-z0-9_.-]* [0-9][0-9a-z.+]* requires " \
      -e "^ERROR: pip's dependency resolver" \
    || true
}

# Create $VENV if it is not there, with an up-to-date pip and the CPU torch.
venv_with_cpu_torch() {
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  pipi --upgrade pip
  pipi "torch==2.13.0"
}
