import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FerryError } from '../src/errors.ts';
import { AgentClient } from '../src/transport/client.ts';
import { startAgent, type AgentProcess } from '../lab/agents.ts';
import { createHosts, type Cluster } from '../lab/hosts.ts';

// wss with mutual TLS between real agents: memory images hold secrets, so
// the encrypted path must work end to end, and strangers must be refused.

interface Pki {
  directory: string;
  ca: string;
  certFor: (name: string) => { cert: string; key: string };
}

async function makePki(addresses: Record<string, string>): Promise<Pki> {
  const directory = mkdtempSync(join(tmpdir(), 'ferry-pki-'));
  const file = (name: string) => join(directory, name);
  const openssl = (args: string[]) => execa('openssl', args, { cwd: directory });
  await openssl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '2',
    '-subj', '/CN=ferry-test-ca', '-keyout', 'ca.key', '-out', 'ca.pem']);
  for (const [name, address] of Object.entries(addresses)) {
    await openssl(['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-subj', `/CN=${name}`,
      '-keyout', `${name}.key`, '-out', `${name}.csr`]);
    const extensions = `subjectAltName=IP:${address}\nextendedKeyUsage=serverAuth,clientAuth\n`;
    await execa('sh', ['-c', `printf '${extensions}' > ${name}.ext`], { cwd: directory });
    await openssl(['x509', '-req', '-in', `${name}.csr`, '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial',
      '-days', '2', '-extfile', `${name}.ext`, '-out', `${name}.pem`]);
  }
  return {
    directory,
    ca: file('ca.pem'),
    certFor: (name) => ({ cert: file(`${name}.pem`), key: file(`${name}.key`) }),
  };
}

describe('wss with mutual TLS', () => {
  let cluster: Cluster;
  let pki: Pki;
  const agents: AgentProcess[] = [];
  const urls: string[] = [];

  beforeAll(async () => {
    cluster = await createHosts(2);
    const [hostA, hostB] = cluster.hosts as [Cluster['hosts'][0], Cluster['hosts'][0]];
    pki = await makePki({ a: hostA.address, b: hostB.address, client: '127.0.0.1' });
    for (const [name, host] of [['a', hostA], ['b', hostB]] as const) {
      const { cert, key } = pki.certFor(name);
      agents.push(await startAgent(host, { extraArgs: ['--tls-cert', cert, '--tls-key', key, '--tls-ca', pki.ca] }));
      urls.push(`wss://${host.address}:7070`);
    }
  });

  afterAll(async () => {
    for (const agent of agents) await agent.stop().catch(() => undefined);
    await cluster?.destroy();
    if (pki) rmSync(pki.directory, { recursive: true, force: true });
  });

  const clientCredentials = () => {
    const { cert, key } = pki.certFor('client');
    return { ca: readFileSync(pki.ca), cert: readFileSync(cert), key: readFileSync(key) };
  };

  it('serves a client that presents a certificate signed by the CA', async () => {
    const client = await AgentClient.connect({ url: urls[0]!, token: agents[0]!.token, ...clientCredentials() });
    try {
      const info = await client.request('info', {});
      expect(info.name).toBe('h0');
    } finally {
      client.close();
    }
  });

  it('refuses a client without a certificate, and one that does not trust the agent', async () => {
    const { ca } = clientCredentials();
    await expect(AgentClient.connect({ url: urls[0]!, token: agents[0]!.token, ca })).rejects.toBeInstanceOf(FerryError);
    const { cert, key } = clientCredentials();
    await expect(AgentClient.connect({ url: urls[0]!, token: agents[0]!.token, cert, key })).rejects.toMatchObject({
      code: 'PEER_GONE',
    });
  });

  it('migrates a container over wss, the source authenticating with its own certificate', async () => {
    const client = await AgentClient.connect({ url: urls[0]!, token: agents[0]!.token, ...clientCredentials() });
    const clientB = await AgentClient.connect({ url: urls[1]!, token: agents[1]!.token, ...clientCredentials() });
    try {
      await client.request('run', {
        spec: {
          name: 'secret',
          rootfs: join(import.meta.dirname, '..', '.build', 'rootfs', 'busybox'),
          command: ['/bin/counter'],
          env: {},
          cwd: '/',
          privateNetwork: false,
          labels: {},
        },
      });
      const report = await client.request('migrate', {
        name: 'secret',
        destination: { url: urls[1]!, token: agents[1]!.token, ca: readFileSync(pki.ca, 'utf8') },
        options: { strategy: 'auto', maxDowntimeMs: 300, maxRounds: 8, rootfsPrecopy: true, timeoutMs: 120_000 },
      });
      expect(report.outcome).toBe('succeeded');
      const onB = await clientB.request('list', {});
      expect(onB.containers.map((container) => [container.name, container.status])).toEqual([['secret', 'running']]);
      expect((await client.request('list', {})).containers).toEqual([]);
    } finally {
      await clientB.request('remove', { name: 'secret', force: true }).catch(() => undefined);
      client.close();
      clientB.close();
    }
  });
});
