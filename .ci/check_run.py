"""CI: the artifacts a finished `optimlab train` run promises (README, "A run directory"), and
no warning printed on the way.  Usage: python .ci/check_run.py RUN_DIR LOG_FILE"""

import json
import sys
from pathlib import Path

run, log = Path(sys.argv[1]), Path(sys.argv[2]).read_text()
problems = []
for name in ("checkpoint.pt", "best_model.safetensors", "metrics.json"):
    if not (run / name).is_file():
        problems.append(f"missing {name}")
preds = sorted(p.name for p in (run / "predictions").glob("*.csv")) if (run / "predictions").is_dir() else []
if len(preds) != 2:
    problems.append(f"expected dev and test predictions, found {preds}")
if (run / "metrics.json").is_file():
    metrics = json.loads((run / "metrics.json").read_text())
    if metrics.get("status") != "finished":
        problems.append(f"status {metrics.get('status')!r}, expected 'finished'")
for bad in ("Warning", "Traceback"):
    if bad in log:
        problems.append(f"the run printed a {bad}")
if problems:
    sys.exit("CI main job: " + "; ".join(problems))
print(f"CI main job: {run} has every artifact ({', '.join(preds)}), status finished")
