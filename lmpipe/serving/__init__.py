"""Serving: the production HTTP endpoint over the model package (lmpipe/package.py).

    lmpipe serve --model-uri models:/lmpipe-sst2@champion        # lmpipe/serving/app.py
    curl -s localhost:8000/predict -H 'content-type: application/json' -d '{"texts": ["a gem of a film"]}'

HTTP only: app (routes, payload limits, serve), batching, metrics, auth, drift, reload. It imports the model
package; nothing in the library imports it (the `lmpipe serve` command does).
"""

from __future__ import annotations

# versions registered before lmpipe/package.py existed pickled their class as lmpipe.serving.ClassifierPyfunc:
# unpickling one looks the name up here, so the name stays, an alias of the one class
from lmpipe.package import ClassifierPyfunc  # noqa: F401
