// The layering rule (issue 14), checked by `npm run lint:layers`, which
// `bash scripts/run.sh test` (and so .ci/run) runs before the tests:
//
//   cli/                     the application: commands, output, config, demo
//   agent/   coordinator/    the two services; neither imports the other
//   lab/                     netns hosts and agents for tests, benchmarks, demo
//   src/                     the library: imports nothing above it
//
// test/ and bench/ may import anything.
/** @type {import('dependency-cruiser').IConfiguration} */
module.exports = {
  forbidden: [
    {
      name: 'src-is-a-leaf',
      comment: 'src/ is the shared library: it imports nothing from the applications, services, lab, tests or benchmarks',
      severity: 'error',
      from: { path: '^src/' },
      to: { path: '^(agent|coordinator|cli|lab|test|bench)/' },
    },
    {
      name: 'agent-stands-alone',
      comment: 'the agent imports only src/ (not the coordinator, the CLI, the lab, tests or benchmarks)',
      severity: 'error',
      from: { path: '^agent/' },
      to: { path: '^(coordinator|cli|lab|test|bench)/' },
    },
    {
      name: 'coordinator-stands-alone',
      comment: 'the coordinator imports only src/ (not the agent, the CLI, the lab, tests or benchmarks)',
      severity: 'error',
      from: { path: '^coordinator/' },
      to: { path: '^(agent|cli|lab|test|bench)/' },
    },
    {
      name: 'lab-is-not-test',
      comment: 'the lab is shared with ferry demo and the benchmarks: it does not import tests or benchmarks',
      severity: 'error',
      from: { path: '^lab/' },
      to: { path: '^(test|bench)/' },
    },
    {
      name: 'no-unresolvable',
      comment: 'an import the check cannot resolve could hide a broken rule',
      severity: 'error',
      from: {},
      to: { couldNotResolve: true },
    },
  ],
  options: {
    // TypeScript 7 has no compiler API for dependency-cruiser; swc parses the .ts files
    // (type-only imports count too).
    parser: 'swc',
    doNotFollow: { path: 'node_modules' },
    exclude: { path: '^(node_modules|\\.build|\\.tools)/' },
    moduleSystems: ['es6'],
    // Resolve packages through their exports maps, as Node does (@bufbuild/protobuf/wire).
    enhancedResolveOptions: { exportsFields: ['exports'], conditionNames: ['import', 'node', 'default'] },
  },
};
