"""Watched input subscriptions: one that stays silent while a publisher is matched is recreated.

A DDS reader can stop receiving for good while its publisher goes on (seen with large images
over shared memory on a loaded machine while other subscribers came and went); a new
subscription is a new reader. Silence is measured on the wall clock, and each recreation
doubles the wait before the next one (up to 32x), so a publisher that is merely paused (a
simulator between episodes) costs a log line now and then.
"""

from __future__ import annotations

import time


class InputWatch(dict):
    """topic -> its subscription's state ("received", "resubscribed", ...), for one node."""

    def __init__(self, node, silence_s: float, reject):
        """Watch subscriptions made on `node`; `reject(cause, message)` reports a recreation."""
        super().__init__()
        self.node, self.silence_s, self.reject = node, float(silence_s), reject

    def subscribe(self, topic: str, message_type, callback, qos) -> None:
        """Subscribe to `topic`, noting when each message arrives."""
        def received(msg, callback=callback, topic=topic):
            self[topic]["received"] = time.monotonic()
            callback(msg)

        entry = self.setdefault(topic, {"received": None, "resubscribed": 0, "backoff": 1.0,
                                        "type": message_type, "callback": callback, "qos": qos})
        entry["subscription"] = self.node.create_subscription(message_type, topic, received, qos)
        entry["since"] = time.monotonic()

    def check(self) -> None:
        """Recreate the subscription of each input silent too long with a publisher matched."""
        now = time.monotonic()
        for topic, entry in self.items():
            last = entry["received"]
            if last is not None and last >= entry["since"]:
                entry["backoff"] = 1.0
            reference = max(entry["since"], last or entry["since"])
            if now - reference < self.silence_s * entry["backoff"]:
                continue
            publishers = self.node.count_publishers(topic)
            if publishers == 0:
                continue
            self.node.destroy_subscription(entry["subscription"])
            self.subscribe(topic, entry["type"], entry["callback"], entry["qos"])
            entry["resubscribed"] += 1
            entry["backoff"] = min(entry["backoff"] * 2.0, 32.0)
            self.reject("input_resubscribed",
                        f"no message on {topic} for {now - reference:.1f} s while {publishers} "
                        "publisher(s) are matched: subscription recreated")
