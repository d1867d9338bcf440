# Shortcuts for dev.py, which does the same on any OS.
.PHONY: run test
run:
	python3 dev.py run
test:
	python3 dev.py test
