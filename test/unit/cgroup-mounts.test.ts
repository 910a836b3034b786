// Finding the cgroup hierarchies from /proc/self/mountinfo.
import { describe, expect, it } from 'vitest';
import { findCgroupMounts, parseMountInfo } from '../../src/cgroup/mounts.ts';

// A hybrid host (systemd's layout on Debian 12 with v1 controllers): cgroup2 at
// unified/, v1 controllers beside it, one mount point with an escaped space and
// one with optional fields (shared:, master:) before the separator.
const hybrid = `
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:27 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:28 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 30 0:30 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
36 30 0:33 / /sys/fs/cgroup/freezer rw,relatime shared:12 master:3 - cgroup cgroup rw,freezer
39 30 0:36 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
40 30 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
51 22 0:45 / /mnt/my\\040disk rw,relatime - ext4 /dev/vdb1 rw
`;

describe('parseMountInfo', () => {
  const entries = parseMountInfo(hybrid);

  it('reads every mount line and skips blank ones', () => {
    expect(entries).toHaveLength(8);
  });

  it('takes mount point, type, source and super options from either side of the separator', () => {
    expect(entries.find((entry) => entry.mountPoint === '/sys/fs/cgroup/freezer')).toEqual({
      mountPoint: '/sys/fs/cgroup/freezer',
      fsType: 'cgroup',
      source: 'cgroup',
      superOptions: ['rw', 'freezer'],
    });
  });

  it('decodes octal escapes in mount points', () => {
    expect(entries.at(-1)).toMatchObject({ mountPoint: '/mnt/my disk', fsType: 'ext4', source: '/dev/vdb1' });
  });

  it('ignores malformed lines', () => {
    expect(parseMountInfo('garbage without separator\n1 2 3 - \n')).toEqual([]);
  });
});

describe('findCgroupMounts', () => {
  it('finds both the v2 hierarchy and the v1 freezer on a hybrid host', () => {
    expect(findCgroupMounts(parseMountInfo(hybrid))).toEqual({
      v2: '/sys/fs/cgroup/unified',
      v1Freezer: '/sys/fs/cgroup/freezer',
    });
  });

  it('finds only v2 on a unified host', () => {
    const unified = '25 22 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n';
    expect(findCgroupMounts(parseMountInfo(unified))).toEqual({ v2: '/sys/fs/cgroup', v1Freezer: undefined });
  });

  it('finds a freezer co-mounted with other v1 controllers, and not one named like it', () => {
    const v1 = [
      '31 30 0:28 / /cg/named rw - cgroup cgroup rw,name=freezerish',
      '32 30 0:29 / /cg/cpu,freezer rw - cgroup cgroup rw,cpu,freezer',
    ].join('\n');
    expect(findCgroupMounts(parseMountInfo(v1))).toEqual({ v2: undefined, v1Freezer: '/cg/cpu,freezer' });
  });
});
