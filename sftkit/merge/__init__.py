"""The merge: export, the served template, the proof and behaviour checks, verify-merge, chat."""
