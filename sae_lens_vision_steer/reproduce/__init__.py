"""`vision-steer reproduce`: the paper's evaluation as one declared grid (`grid`), planned into caches,
SAE trainings and evaluation groups (`plan`), run resumably reusing everything on disk (`runner`),
counted before running (`dryrun`, `costs`) and written as paper-style tables next to the paper's
numbers (`tables`). `methods` registers `vs2_last_n` (multi-layer VS2) in the evaluation runner."""

from .grid import Backbone, Cell, DataSource, Entry, Grid, SAESpec, Sizes
from .paper import paper_grid
from .plan import make_plan
from .runner import GridRunner, RunReport, cell_states
from .tables import paper_value, write_tables

__all__ = ["Backbone", "Cell", "DataSource", "Entry", "Grid", "GridRunner", "RunReport", "SAESpec", "Sizes",
           "cell_states", "make_plan", "paper_grid", "paper_value", "write_tables"]
