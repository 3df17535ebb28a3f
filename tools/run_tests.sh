#!/usr/bin/env bash
# The test command of the README (and exactly what CI's .ci/run runs):
#   1. install the CPU set-up and the project (builds the C++ extension),
#   2. where we are root on Debian, start a real one-node Slurm (+ OpenMPI) for the launcher tests,
#   3. run the whole pytest suite; "no tests collected" counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m pip install -q -r requirements-cpu.txt
python3 -m pip install -q --no-build-isolation -e .

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ "${MTP_SKIP_SLURM:-0}" != 1 ]; then
  # A failed start only skips the Slurm/mpirun launcher tests; stop always runs.
  bash .ci/local_slurm.sh start || echo "local Slurm unavailable: the Slurm launcher tests will skip" >&2
  trap 'bash .ci/local_slurm.sh stop || true' EXIT
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
set +e
python3 -m pytest -q -p no:cacheprovider --durations=15 tests "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests: treating that as a failure" >&2
  exit 1
fi
exit "$rc"
