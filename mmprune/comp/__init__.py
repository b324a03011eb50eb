"""CoMP: collaborative importance (CIM), the multi-mode scheduler (MPS) and the search loop."""
