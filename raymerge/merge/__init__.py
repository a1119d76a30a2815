"""The pure merge core: no Ray, no storage, no globals. A recipe and loaded inputs in, the
merged adapter's tensors, its config and a record of what ran out (`raymerge.merge.core`)."""
