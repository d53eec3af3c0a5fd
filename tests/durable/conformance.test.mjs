// The Durable Streams server conformance suite against relayd (CONFORMANCE_TEST_URL is the mount's
// base URL). Run by tests/test_durable_conformance.py, which starts relayd and reads results.json.
// The upstream CLI finds no tests under vitest 4 (durable-streams/durable-streams#284): call the
// exported runner from a test file of our own, as the upstream repository does for its servers.
import { runConformanceTests } from "@durable-streams/server-conformance-tests"

const baseUrl = process.env.CONFORMANCE_TEST_URL
if (!baseUrl) throw new Error("CONFORMANCE_TEST_URL is required")
runConformanceTests({ baseUrl, longPollTimeoutMs: 20000, subscriptions: false })
