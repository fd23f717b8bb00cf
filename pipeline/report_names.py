"""The report's own files in reports/, whatever sweeps ran: the one list it writes them by and clears
them by, and that a sweep's name is checked against before it runs (a sweep of one key besides the
seed writes `reports/<name>.*` too, which would overwrite one of these)."""
from __future__ import annotations

# The published tables of students, by the file stem the report writes each to; the first holds
# every student the paper reports nowhere.
TABLES = {"table1": "table1", "table2": "table2", "table3": "table3", "appendix_coca": "table-coca"}
INTERVALS = "-intervals"        # `<table>-intervals.*`: every headline metric of a table's rows, with intervals
# The appendices whose setting is a whole study's (its stages before the sweeps): their file stems by table id.
STUDY_SETTINGS = {"appendix_sd21": "appendix-sd21", "appendix_cc3m": "appendix-cc3m"}
# Every appendix table's file stem, by its table id (published.yaml's).
APPENDIX = {"appendix_unet_feature": "appendix-unet-feature", "appendix_diffusion_score": "appendix-diffusion-score",
            "appendix_clevr": "appendix-clevr", **STUDY_SETTINGS}
FIGURES = ("zeroshot", "inference")     # the paper's Fig. 2 and Fig. 1, as .png
SWEEP_PREFIX = "sweep-"                 # every sweep's table and figure: sweep-<name>.*
TABLE1_SWEEP = "table1"                 # the sweep whose seeds make Table 1's rows (sweeps/table1.yaml)


def fixed_stems() -> tuple[str, ...]:
    """The stems of the report's files that no sweep names."""
    return (*TABLES.values(), *(stem + INTERVALS for stem in TABLES.values()), *APPENDIX.values(), *FIGURES)
