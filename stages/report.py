"""DVC stage `report`: the Table-1-shaped table (Markdown, LaTeX, CSV) from the runs in MLflow."""
import json
import sys

from pipeline import cli
from pipeline.report import write_table1
from pipeline.tracking import Tracker


def body(args, cfg, root):
    results = root / "results"
    baselines = json.loads((results / "baselines.json").read_text())
    ordered = [(f"pretrained {name}", baselines[f"pretrained/{name}"]["run_id"]) for name in cfg.students
               if name == cfg.train.student]
    for variant, label in (("clip", "FT with L_CLIP"), ("sds", f"FT with L_CLIP + {cfg.objective.lambda_sds:g} L_SDS")):
        ordered.append((label, json.loads((results / f"train-{variant}.json").read_text())["run_id"]))
    ordered.append((f"diffusion score ({cfg.teacher.name})", baselines["diffusion_score"]["run_id"]))
    runs = Tracker(cfg.tracking, root).runs(run_id for _, run_id in ordered)
    write_table1([(label, run["metrics"]) for (label, _), run in zip(ordered, runs)], root / "reports")


def main(argv=None) -> int:
    return cli.run(__doc__, body, argv)


if __name__ == "__main__":
    sys.exit(main())
