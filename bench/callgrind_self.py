#!/usr/bin/env python3
"""Self cost (instructions spent in a function's own code, not in what it calls) per request,
from a callgrind profile, and who calls a function.

callgrind_annotate's `--inclusive=no` lists a whole-program total under `clone` for the
proxy's profiles (threads started before the measurement), so this reads the file itself.

Usage: callgrind_self.py [--event NAME] CALLGRIND.OUT REQUESTS [TOP]
       callgrind_self.py CALLGRIND.OUT REQUESTS --callers NAME_PART
       callgrind_self.py CALLGRIND.OUT REQUESTS --callsites NAME_PART   (by source line: which
           moves are the memcpy calls, say; the line is where the call was inlined to)

--event NAME counts another of the profile's events instead of instructions (Ir): with
PROFILE_CALLGRIND_OPTS="--cache-sim=yes --branch-sim=yes", D1mr/D1mw (first-level data cache
read/write misses), I1mr (instruction cache misses) or Bim (mispredicted indirect branches).
"""
import collections
import re
import sys


def main():
    event = "Ir"
    if len(sys.argv) > 2 and sys.argv[1] == "--event":
        event = sys.argv[2]
        del sys.argv[1:3]
    column = None
    path, requests = sys.argv[1], max(int(sys.argv[2]), 1)
    mode = sys.argv[3] if len(sys.argv) > 4 else None
    callers_of = sys.argv[4] if mode in ("--callers", "--callsites") else None
    by_site = mode == "--callsites"
    top = int(sys.argv[3]) if len(sys.argv) > 3 and callers_of is None else 40
    def decoder():
        # Function and file names are written once in full as "(id) name", then as "(id)".
        seen = {}

        def decode(token):
            m = re.match(r"\((\d+)\)(?: (.*))?", token)
            if not m:
                return token
            if m.group(2):
                seen[m.group(1)] = m.group(2)
            return seen.get(m.group(1), m.group(1))

        return decode

    name, file_name = decoder(), decoder()

    own = collections.Counter()
    called = collections.Counter()
    calls = collections.Counter()
    fn = callee = None
    pending_calls = None
    file = None
    position = 0

    with open(path) as f:
        for line in f:
            if line.startswith("events:"):
                events = line.split()[1:]
                if event not in events:
                    sys.exit(f"no event {event} in this profile (it has {' '.join(events)})")
                column = 1 + events.index(event)
            elif line.startswith(("fl=", "fi=", "fe=")):
                file = file_name(line[3:].strip())
            elif line.startswith("fn="):
                fn = name(line[3:].strip())
            elif line.startswith("cfn="):
                callee = name(line[4:].strip())
            elif line.startswith("calls="):
                pending_calls = int(line[6:].split()[0])
            elif line[:1].isdigit() or line[:1] in "+-*":
                parts = line.split()
                if len(parts) < 2:
                    continue
                # Trailing zero costs are left out of a line.
                cost = int(parts[column]) if column < len(parts) else 0
                # Positions are compressed: `+n`/`-n` relative to the last one, `*` the same.
                token = parts[0]
                if token == "*":
                    pass
                elif token[0] in "+-":
                    position += int(token)
                else:
                    position = int(token)
                if pending_calls is not None:
                    # The line after calls= is the call's inclusive cost, not the caller's own.
                    if callers_of and callers_of in callee:
                        site = f"{file}:{position}  ({fn[:80]})" if by_site else fn
                        called[site] += cost
                        calls[site] += pending_calls
                    pending_calls = None
                else:
                    own[fn] += cost
    if callers_of:
        what = "call sites" if by_site else "callers"
        print(f"== {what} of *{callers_of}*: {event} per request, calls per request")
        for caller, cost in called.most_common(top):
            print(f"{cost / requests:8.1f} {calls[caller] / requests:6.2f}  {caller[-170:]}")
        return
    print(f"== self cost, {event} per request (total {sum(own.values()) / requests:.0f})")
    for function, cost in own.most_common(top):
        print(f"{cost / requests:8.1f}  {function[:150]}")


if __name__ == "__main__":
    main()
