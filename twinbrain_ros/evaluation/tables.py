"""The paper's tables: SimplerEnv's WidowX (Bridge) tasks laid out as in the paper."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

# The paper's column titles for the four Bridge tasks, and its published average.
TITLES = {"widowx_spoon_on_towel": "Put Spoon on Towel",
          "widowx_carrot_on_plate": "Put Carrot on Plate",
          "widowx_stack_cube": "Stack Green Block on Yellow Block",
          "widowx_put_eggplant_in_basket": "Put Eggplant in Yellow Basket"}
PAPER_AVERAGE = 0.620  # TwinBrainVLA, Qwen3-VL-4B, SimplerEnv WidowX


def format_simpler_table(summary: dict, episodes: list[dict]) -> str:
    """The SimplerEnv WidowX table as the paper lays it out.

    A column per Bridge task and the average, with SimplerEnv's partial metric (the object
    grasped at some point) above the success rate, and the paper's published average below.
    """
    from ..sim.simpler_widowx import PROTOCOL_EPISODES

    tasks = [t for t in TITLES if t in summary["tasks"]] + \
        [t for t in summary["tasks"] if t not in TITLES]
    grasped: dict[str, list[bool]] = defaultdict(list)
    for episode in episodes:
        grasped[episode["task"]].append(bool(episode.get("outcome", {}).get("grasped")))
    columns = [TITLES.get(t, t) for t in tasks] + ["Average"]
    width = max(12, *(len(c) for c in columns))
    header = f"{'':<22}" + "".join(f"{c:>{width + 2}}" for c in columns)
    counts = {summary["tasks"][t]["episodes"] for t in tasks}
    # The protocol: SimplerEnv's own first 24 layouts of each task (seeds 0-23).
    protocol = counts == {PROTOCOL_EPISODES} and all(
        e.get("info", {}).get("protocol") for e in episodes)
    lines = [f"SimplerEnv WidowX (Bridge), {'/'.join(str(n) for n in sorted(counts))} episodes "
             f"per task{' (its protocol)' if protocol else ' (not its protocol: episodes 0-23)'}",
             header]
    grasp_rates = [float(np.mean(grasped[t])) if grasped[t] else 0.0 for t in tasks]
    success_rates = [summary["tasks"][t]["success_rate"] for t in tasks]
    for label, rates in (("grasp", grasp_rates), ("success", success_rates)):
        cells = [*rates, float(np.mean(rates)) if rates else 0.0]
        lines.append(f"{label:<22}" + "".join(f"{100 * r:>{width + 1}.1f}%" for r in cells))
    lines.append(f"{'paper (Qwen3-VL-4B)':<22}" + f"{'':>{(width + 2) * len(tasks)}}"
                 + f"{100 * PAPER_AVERAGE:>{width + 1}.1f}%")
    return "\n".join(lines)
