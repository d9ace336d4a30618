"""The rank runtime: the program every rank runs, and what it builds from the topology and the plan.

Layers (tests/test_layout.py checks them): the driver (`orchestrator/*.py`: topology, plan, launch,
control server, metrics, CLI) imports no torch at module level and nothing of this package; this
package imports torch, `core`, `teacher`, `students`, and of the driver only the schemas it reads
(`orchestrator.topology`, `orchestrator.planfile`), never its CLI.

- `rank.py`: the process entry (`python -m dinodist.orchestrator.runtime.rank`), run by the local
  launcher and by the files `dinodist deploy` writes; reads `<out>/topology.yaml` + `plan.json`.
- `jobs.py`: topology + plan -> the teacher's and students' jobs, the exchange plan, target sizes,
  the rank's control-plane thread.
- `live.py`: a rank of a live run (the teacher loop or one student loop).
- `replay.py`: a rank of a group trained from a target store (`dinodist add-student`), and the
  store check the driver runs before it starts any rank.
- `inline.py`: one student with the teacher computed in its own process (the reference the
  distributed runs are compared against).
"""
