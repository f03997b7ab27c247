"""The example configs, shipped in the package (so an installed wheel has them too):
`demo.yaml` (what `make run` serves: three simulators on loopback), `example.yaml` (two
llama.cpp servers, Ollama, OpenAI and Anthropic) and `replicas.yaml` (several replicas
sharing state on Redis: scripts/replicas_demo.py). In a clone, config/ links to them.

    python -c 'import proxy.examples as e; print(e.DIR)'
"""

from pathlib import Path

#: The directory holding the example configs.
DIR = Path(__file__).resolve().parent
