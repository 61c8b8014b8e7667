#!/usr/bin/env python3
"""Self cost (instructions spent in a function's own code, not in what it calls) per request,
from a callgrind profile, and who calls a function.

callgrind_annotate's `--inclusive=no` lists a whole-program total under `clone` for the
proxy's profiles (threads started before the measurement), so this reads the file itself.

Usage: callgrind_self.py CALLGRIND.OUT REQUESTS [TOP]
       callgrind_self.py CALLGRIND.OUT REQUESTS --callers NAME_PART
       callgrind_self.py CALLGRIND.OUT REQUESTS --callsites NAME_PART   (by source line: which
           moves are the memcpy calls, say; the line is where the call was inlined to)
"""
import collections
import re
import sys


def main():
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
            if line.startswith(("fl=", "fi=", "fe=")):
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
                        called[site] += int(parts[1])
                        calls[site] += pending_calls
                    pending_calls = None
                else:
                    own[fn] += int(parts[1])
    if callers_of:
        what = "call sites" if by_site else "callers"
        print(f"== {what} of *{callers_of}*: instructions per request, calls per request")
        for caller, cost in called.most_common(top):
            print(f"{cost // requests:8d} {calls[caller] / requests:6.2f}  {caller[-170:]}")
        return
    print(f"== self cost, instructions per request (total {sum(own.values()) // requests})")
    for function, cost in own.most_common(top):
        print(f"{cost // requests:8d}  {function[:150]}")


if __name__ == "__main__":
    main()
