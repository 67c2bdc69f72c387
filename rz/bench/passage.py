"""A varied English passage, long enough for more than 1,000 tokens under any of the test models' vocabularies:
the input of input-grounded workloads (rz.bench.speculative) and of long-context tests."""

PASSAGE = """\
The lighthouse on the northern cape was built in 1874, after a winter in which three ships ran \
aground within sight of the harbour. Its first keeper, a retired schoolteacher named Eliza Marsh, \
kept a logbook that survives to this day. In careful handwriting she recorded the weather twice a \
day, the ships that passed, and the birds that struck the lantern glass during the autumn \
migration. Historians value the logbook less for its drama than for its patience: page after page \
of wind directions, barometer readings and small observations, such as the date on which the first \
swallows returned each spring.

Patience is also the central virtue of bread making. A sourdough starter is nothing more than \
flour and water left long enough for wild yeasts and lactic acid bacteria to settle in. Feed it \
regularly and it becomes predictable; neglect it and it turns sour, sluggish, or simply dies. A \
baker mixes the starter with more flour, water and salt, folds the dough every half hour to build \
strength, and then leaves it to rise slowly, often overnight in a cool room. The long fermentation \
develops flavour and makes the loaf easier to digest. When the dough finally goes into a very hot \
oven, the trapped gas expands, the crust sets, and the familiar crackling sound begins as the bread \
cools on the rack.

In mathematics, some of the most useful ideas are also the simplest. Consider the prime numbers: \
2, 3, 5, 7, 11, 13, and so on, each divisible only by one and itself. Euclid proved more than two \
thousand years ago that there is no largest prime. Suppose there were a finite list of them; \
multiply them all together and add one. The result leaves a remainder of one when divided by any \
prime on the list, so either it is prime itself or it has a prime factor missing from the list. \
Either way the list was incomplete. The argument fits on a napkin, yet modern cryptography, which \
protects bank transfers and private messages, rests on questions about primes that remain hard \
even for the fastest computers.

Computers, of course, do not understand numbers the way people do. A processor moves bits between \
registers, adds them, compares them and jumps to new instructions, billions of times each second. \
Programmers build layers of abstraction on top of this machinery: assembly language, then compiled \
languages such as C, then interpreted languages, libraries and frameworks. Each layer hides details \
of the one below, which makes software faster to write and easier to read, but occasionally the \
details leak through. A loop that looks harmless may be slow because it reads memory in the wrong \
order; a calculation may drift because floating point numbers cannot represent one tenth exactly.

"Why do you keep the old radio?" my niece asked last summer, pointing at the wooden set on the \
kitchen shelf. I told her that it had belonged to her great-grandfather, who listened to football \
matches on it every Saturday afternoon, shouting at the referee as if the man could hear him. The \
radio no longer works. One of its valves burned out years ago, and nobody in the family knows how \
to replace it. Still, when I switch on the dial light, which somehow survives, the kitchen smells \
faintly of warm dust, and for a moment I am seven years old again, sitting on the floor while the \
commentator's voice rises with every attack on goal.

The river that runs past the town changes character with the seasons. In March it is brown and \
swollen with meltwater from the hills, carrying branches, plastic bottles and occasionally an \
entire fence post. By July it has shrunk to a clear, lazy stream where children catch minnows in \
jam jars and dragonflies hover over the reeds. In October the first storms return, and the water \
rises again, fast and cold. The town council has argued for decades about whether to build a flood \
wall. Engineers say it would protect the low streets near the bridge; residents worry that it would \
cut them off from the river they have always lived beside.

Good instructions are harder to write than they look. To explain how to change a bicycle tyre, \
one must remember every step that an expert performs without thinking: shift to the smallest gear, \
open the brake, loosen the axle, remove the wheel, let out the remaining air, lever one side of the \
tyre over the rim, and pull out the tube. Then the puncture has to be found, usually by pumping the \
tube and listening for a hiss or holding it under water and watching for bubbles. Skip a single \
step and the reader is stranded at the side of the road with a wheel in one hand, a tyre lever in \
the other, and no idea what to do next.

Scientists studying sleep have found that the brain is remarkably busy while we rest. During deep \
sleep, slow waves of electrical activity sweep across the cortex, and memories from the day appear \
to be replayed and consolidated. During dream sleep the eyes dart back and forth, the muscles of \
the body are temporarily paralysed, and the emotional centres of the brain become highly active. \
Students who sleep after learning a list of words tend to remember more of them the next morning \
than students who stay awake for the same number of hours, which suggests that an early night may \
be worth more than a late evening of revision.

At the end of her first year, Eliza Marsh wrote a short summary on the last page of the logbook. \
She counted two hundred and twelve ships, nine storms strong enough to shake the tower, and one \
shipwreck, a small fishing boat whose crew rowed safely ashore in the morning fog. "The light has \
been lit every night," she concluded, "and that is the whole of the work." Visitors who climb the \
spiral staircase today can read those words on a brass plate fixed beside the lantern, polished \
by more than a century of curious hands.
"""


# A Python function of about 500 tokens: the input of the code-edit workload (rz.bench.speculative),
# which asks for it back with one change.
CODE = '''\
def schedule_deliveries(orders, vehicles, depot, max_stops=12, max_minutes=480):
    """Assign each order to a vehicle and order each vehicle's stops.

    orders: a list of dicts with "id", "location" (x, y), "weight" and "deadline" (minutes).
    vehicles: a list of dicts with "id" and "capacity". depot: the (x, y) every route starts at.
    Returns {vehicle id: [order ids in the order they are delivered]} and the orders left over.
    """
    def distance(a, b):
        return ((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) ** 0.5

    def travel_minutes(a, b, speed=0.5):
        return distance(a, b) / speed

    pending = sorted(orders, key=lambda order: (order["deadline"], -order["weight"]))
    routes = {vehicle["id"]: [] for vehicle in vehicles}
    loads = {vehicle["id"]: 0.0 for vehicle in vehicles}
    clocks = {vehicle["id"]: 0.0 for vehicle in vehicles}
    positions = {vehicle["id"]: depot for vehicle in vehicles}
    capacities = {vehicle["id"]: vehicle["capacity"] for vehicle in vehicles}
    left_over = []
    for order in pending:
        best, best_arrival = None, None
        for vehicle_id, route in routes.items():
            if len(route) >= max_stops:
                continue
            if loads[vehicle_id] + order["weight"] > capacities[vehicle_id]:
                continue
            arrival = clocks[vehicle_id] + travel_minutes(positions[vehicle_id], order["location"])
            back = arrival + travel_minutes(order["location"], depot)
            if arrival > order["deadline"] or back > max_minutes:
                continue
            if best is None or arrival < best_arrival:
                best, best_arrival = vehicle_id, arrival
        if best is None:
            left_over.append(order["id"])
            continue
        routes[best].append(order["id"])
        loads[best] += order["weight"]
        clocks[best] = best_arrival
        positions[best] = order["location"]
    return routes, left_over
'''
