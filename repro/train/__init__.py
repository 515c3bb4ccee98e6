"""One training run from a resolved config: the loop, optimisers and schedules, multi-process scale-out, run loggers, the teacher-output cache a run opens."""
