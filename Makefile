PY := .venv/bin/python
STAMP := .venv/.installed
# exact versions of everything installed (pyproject.toml only declares ranges)
CONSTRAINTS := constraints.txt

.PHONY: demo test lint install bench clean

# reinstalled whenever the declared dependencies or their pins change
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -c $(CONSTRAINTS) --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	.venv/bin/distdm demo --out runs/demo

lint: $(STAMP)
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/ruff format --check src tests benchmarks

test: lint
	.venv/bin/pytest -q

clean:
	rm -rf runs .pytest_cache
