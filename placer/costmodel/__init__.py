"""The cost model: the event-driven simulator (:mod:`.sim` over the numba kernel :mod:`._sim_kernel`), the
micro-batch schedules, the
micro-batch schedules it and the engine follow (:mod:`.schedules`), and lower bounds on a step (:mod:`.bounds`)."""
