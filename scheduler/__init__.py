"""scheduler: decides where each chunk lives and where each update runs.

profile.py (HardwareProfile: measured or hand-written rates and capacities, each with its source), probe.py
(``offload probe``), workload.py (per-unit bytes, FLOPs, activations from shapes or a meta-device model), cost.py
(bytes per link, busy times, simulated timeline, lower bound), planner.py (Plan, ``plan()``, comparison
strategies), report.py (``offload plan``'s text, JSON, Chrome trace, SVG), replan.py (calibration from measured
iterations, ``Replanner``: re-planning during training).

Imports ``storage`` only, never ``offload`` (tests/test_layers.py enforces it).
"""

from scheduler.cost import CostModel, Prediction
from scheduler.planner import Plan, UnitPlacement, plan
from scheduler.profile import HardwareProfile
from scheduler.replan import Replanner, calibrate
from scheduler.workload import Workload

__all__ = ["HardwareProfile", "Workload", "CostModel", "Prediction", "Plan", "UnitPlacement", "plan", "Replanner",
           "calibrate"]
