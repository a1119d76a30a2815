"""`raymerge bench`: measurements reported from one run on one machine (never timed tests).

- `plan`: the driver planning and dispatch-ordering a huge sweep (time, peak memory, loads).
- `manifest`: bytes uploaded by the manifest over a long sweep, and a resume's peak memory.
- `merge`: a whole `raymerge run` per combination type against the plain PEFT loop and the I/O
  floor, at a small size or a realistic one (`--shape llama-8b`).
- `cluster`: a large sweep on a simulated multi-node Ray cluster (worker utilisation, driver cost).
"""
