.PHONY: install test demo bench
install:        ## install asset_dist and its dependencies (torch pinned first on CPU)
	bash scripts/install.sh
test:           ## the test suite (starts a local one-node SLURM cluster for the launch tests)
	bash scripts/run_tests.sh
demo:           ## the main job on the bundled sample data, on CPU
	bash quickstart.sh
