"""Running a sweep on Ray: the session, workers, dispatch and scheduling, resume, keep top-k,
job submission, and rebuilding recorded merges (`materialize`)."""
