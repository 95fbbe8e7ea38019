"""One module per stage: render, train, merge, optimize, evaluate (+ report). Each is a function
from a run (copa.runs.Run) to the artifacts it wrote; none of them knows the order of stages
(copa.pipeline does)."""
