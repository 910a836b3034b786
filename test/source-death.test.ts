// The source agent SIGKILLed just after it started CRIU's dump: the page
// pipes lose their reader, and a CRIU that had not opened one yet blocks
// opening it with the tasks seized. The restarted agent must let it finish
// (reading and discarding the pipes) before it thaws the container, which
// then answers with its memory intact. Without that, 0 and 5 ms left the
// container alive, thawed and deaf (the faults test's rare failure).
import { afterAll, beforeAll, expect, it } from 'vitest';
import {
  failureOf,
  memloadSpec,
  migrate,
  requestChecksum,
  requestVerify,
  runContainer,
  startNodes,
  waitForMemload,
  waitUntilClean,
  type TestCluster,
} from './helpers/migration.ts';

let test: TestCluster;

beforeAll(async () => {
  test = await startNodes(2);
});

afterAll(async () => {
  await test?.close();
});

for (const delay of [0, 5, 10, 40]) {
  it(`survives the source agent dying ${delay} ms after CRIU's dump started`, async () => {
    const name = `early${delay}`;
    const a = await test.restartAgent(0, { env: { FERRY_FAULTS: `die-during-dump:${delay}` } });
    const b = test.nodes[1]!;
    await runContainer(a, memloadSpec(name, 128));
    await waitForMemload(a, name);
    const checksum = await requestChecksum(a, name);
    await failureOf(migrate(a, b, name));
    await waitUntilClean(b, name);
    const restarted = await test.restartAgent(0);
    await restarted.agent.waitForLog((entry) => entry.json?.msg === 'interrupted outgoing migration rolled back: container thawed here');
    expect(await requestChecksum(restarted, name)).toBe(checksum);
    expect(await requestVerify(restarted, name)).toMatch(/^verify ok /);
    await restarted.client.request('remove', { name, force: true });
  });
}
