"""The contract between the stages: where each output lives, what identifies it, when to trust it
(layout), the proof of a reference cache's values (refvalues) and a run's metrics log (metrics).
Stages never import each other: they meet here and in the files on disk."""
