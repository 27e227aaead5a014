"""The trainer behind ``placer train`` (:mod:`placer.app.train` is its entry point): the run config with its
presets (:mod:`.config`), the loop over one graph or several (:mod:`.trainer`), its callbacks (:mod:`.callbacks`),
the checkpoint format (:mod:`.checkpoint`) and the random training graphs (:mod:`.families`)."""
