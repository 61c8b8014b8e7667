#!/usr/bin/env node
// Summarises a cache-tests results JSON (written by scripts/cache-tests.sh) and gates on it.
//
//   node scripts/cache-tests-summary.mjs RESULTS.json SUITE_DIR MIN_REQUIRED_PASSED
//
// SUITE_DIR is the installed http-cache-tests package; its test definitions are read from
// tests/index.mjs plus tests/surrogate-control.mjs, which the package's CLI also runs.
// Exits 1 if fewer than MIN_REQUIRED_PASSED required tests pass.
//
// Kinds, as the suite defines them: no `kind` or `kind: 'required'` is a MUST-level
// conformance test; 'optimal' is a SHOULD / optimal-cache test; 'check' is informational.
// `browser_only` tests are not run by the CLI and are left out. A result is `true` (pass) or
// [errorName, message]. As on cache-tests.fyi, a test only counts as passed if every test in
// its `depends_on` passed too.
//
// http-cache-tests@0.4.5 has 160 required tests in tests/index.mjs (3 browser_only) and 8 in
// surrogate-control.mjs: 165 run. Larder passes 152; these 13 failures are expected (see
// CONFORMANCE.md), because the newer suite has reversed or fixed them and Larder follows
// RFC 9111 where the two differ:
// - age-parse-* (9): 0.4.5 wants a response with an invalid or repeated `Age` to be stale.
//   RFC 9111 §5.1 says to use the first valid member and ignore an invalid field, and the
//   current suite checks exactly that.
// - stale-close-{must-revalidate,proxy-revalidate,no-cache,s-maxage=2} (4): the origin closes
//   the connection and the response forbids stale use, so Larder answers 504. The 0.4.5 harness
//   treats any response without the server's request counter as "from cache". The current
//   suite checks this correctly and Larder passes.
// The gate fails on any required failure outside that list, and below the threshold.

import fs from 'fs'
import path from 'path'
import { pathToFileURL } from 'url'

const [resultsFile, suiteDir, minArg] = process.argv.slice(2)
const min = Number(minArg)
if (!resultsFile || !suiteDir || !Number.isInteger(min)) {
  console.error('usage: node cache-tests-summary.mjs RESULTS.json SUITE_DIR MIN_REQUIRED_PASSED')
  process.exit(2)
}

const EXPECTED = [/^age-parse-/, /^stale-close-(must-revalidate|proxy-revalidate|no-cache|s-maxage=2)$/]

const results = JSON.parse(fs.readFileSync(resultsFile, 'utf8'))
const load = async f => (await import(pathToFileURL(path.join(suiteDir, 'tests', f)).href)).default
const suites = [...await load('index.mjs'), await load('surrogate-control.mjs')]
const version = JSON.parse(fs.readFileSync(path.join(suiteDir, 'package.json'), 'utf8')).version

const tests = new Map()
for (const suite of suites) {
  for (const test of suite.tests) if (!tests.has(test.id)) tests.set(test.id, test)
}

// Passed: own result true and every dependency passed (like the suite's determineTestResult).
const passed = (id, seen = new Set()) => {
  if (results[id] !== true || seen.has(id)) return results[id] === true
  seen.add(id)
  return (tests.get(id)?.depends_on || []).every(dep => passed(dep, seen))
}
const why = id => {
  const r = results[id]
  if (r === undefined) return 'no result'
  if (Array.isArray(r)) return `${r[0]}: ${r[1]}`
  if (r !== true) return String(r)
  return `depends on failing ${tests.get(id).depends_on.filter(d => !passed(d)).join(', ')}`
}

const kinds = { required: { run: 0, passed: 0 }, optimal: { run: 0, passed: 0 }, check: { run: 0, passed: 0 } }
const failedRequired = []
for (const test of tests.values()) {
  if (test.browser_only) continue
  const kind = test.kind || 'required'
  const k = kinds[kind] || (kinds[kind] = { run: 0, passed: 0 })
  k.run++
  if (passed(test.id)) k.passed++
  else if (kind === 'required') failedRequired.push(test.id)
}

console.log(`http-cache-tests@${version}: ${Object.keys(results).length} results`)
console.log('kind        run  passed  failed')
for (const [kind, k] of Object.entries(kinds)) {
  console.log(`${kind.padEnd(10)}${String(k.run).padStart(5)}${String(k.passed).padStart(8)}${String(k.run - k.passed).padStart(8)}`)
}
console.log(`failed required tests (${failedRequired.length}):`)
for (const id of failedRequired) {
  const expected = EXPECTED.some(re => re.test(id)) ? ' [expected with 0.4.5]' : ''
  console.log(`  ${id}${expected}: ${why(id)}`)
}

const unexpected = failedRequired.filter(id => !EXPECTED.some(re => re.test(id)))
const ok = kinds.required.passed >= min && unexpected.length === 0
if (unexpected.length) console.log(`unexpected required failures: ${unexpected.join(', ')}`)
console.log(`required passed: ${kinds.required.passed} / ${kinds.required.run} (gate: at least ${min}, none unexpected) -> ${ok ? 'ok' : 'FAILED'}`)
process.exit(ok ? 0 : 1)
