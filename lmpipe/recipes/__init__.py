"""One module per pipeline stage: what `python -m stages.<name>` (the DVC stage <name>) does, read top to
bottom. A stage module parses params and calls its recipe through lmpipe.stage.run_stage; the recipe is built
from the shared pieces in lmpipe/."""
