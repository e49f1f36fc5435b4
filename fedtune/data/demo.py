"""The built-in demo dataset: short triage notes with a four-level urgency label.

Generated here, deterministically from a seed, so demos and tests need no download.
The label depends on the symptom *and* on modifiers (patient age, course, vital signs)
that move it up or down, and 5% of labels are flipped: a bag of symptom words is not
enough to score well, but a fine-tuned encoder learns it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

LABELS = ("self-care", "routine", "urgent", "emergency")

SYMPTOMS: dict[int, tuple[str, ...]] = {
    0: ("a mild sore throat", "a runny nose", "a small paper cut on the finger", "mild seasonal sneezing",
        "a dry cough without fever", "a minor bruise on the shin", "slight muscle soreness after exercise",
        "an itchy mosquito bite", "occasional mild heartburn", "a chapped lip"),
    1: ("a persistent rash on the forearm", "ear pain for several days", "a painful urinary burning",
        "lower back pain after lifting", "a sprained ankle that bears weight", "recurring headaches",
        "a low-grade fever", "a swollen tender knee", "sinus pressure with green discharge",
        "a cough with yellow sputum"),
    2: ("a deep cut that keeps bleeding", "high fever with a stiff neck", "vomiting and unable to keep fluids down",
        "severe abdominal pain in the right lower side", "a suspected broken wrist",
        "shortness of breath when climbing stairs", "a head injury with brief confusion",
        "an asthma attack not relieved by the inhaler", "a kidney stone type flank pain",
        "sudden severe eye pain with blurred vision"),
    3: ("crushing chest pain spreading to the left arm", "sudden weakness of one side of the face",
        "not breathing normally and turning blue", "a seizure lasting more than five minutes",
        "heavy bleeding that will not stop", "swelling of the tongue after a bee sting",
        "unresponsive after a fall", "severe burns over a large area",
        "coughing up large amounts of blood", "slurred speech and arm numbness that started suddenly"),
}

# (phrase, change in urgency); a change applies to symptoms of base level 1 or 2 only,
# except the vital-sign alarms, which lift anything below emergency.
PATIENTS = (("a 34-year-old man", 0), ("a 27-year-old woman", 0), ("a 45-year-old teacher", 0),
            ("an 86-year-old woman", 1), ("a 79-year-old man with heart disease", 1),
            ("a 6-month-old infant", 1), ("a pregnant woman", 1), ("a 19-year-old student", 0))
COURSES = (("since this morning", 0), ("for two days", 0), ("that has now fully resolved", -1),
           ("that is getting rapidly worse", 1), ("on and off for a week", 0),
           ("which improved after rest", -1), ("that began an hour ago", 0))
VITALS = (("", 0), ("", 0), ("vital signs are normal", 0), ("oxygen saturation is 86 percent", 2),
          ("blood pressure is 80 over 50", 2), ("temperature is 37.1", 0))
TEMPLATES = ("{patient} presents with {symptom} {course}. {vitals}",
             "Triage call: {symptom} in {patient}, {course}. {vitals}",
             "{Patient} reports {symptom} {course}; {vitals}",
             "Nurse line: {patient} describes {symptom} {course}. {vitals}")
LABEL_NOISE = 0.05


@dataclass(frozen=True)
class Example:
    text: str
    label: int


def _urgency(base: int, patient_shift: int, course_shift: int, vitals_shift: int) -> int:
    level = base
    if 1 <= base <= 2:
        level += patient_shift + course_shift
    if vitals_shift:
        level = max(level, base + vitals_shift)
    return min(max(level, 0), len(LABELS) - 1)


def make_demo_dataset(num_examples: int, seed: int = 0) -> list[Example]:
    """`num_examples` triage notes with labels 0..3 (see LABELS), balanced by base symptom."""
    rng = random.Random(seed)
    examples = []
    for i in range(num_examples):
        base = i % len(LABELS)
        symptom = rng.choice(SYMPTOMS[base])
        patient, p_shift = rng.choice(PATIENTS)
        course, c_shift = rng.choice(COURSES)
        vitals, v_shift = rng.choice(VITALS)
        text = rng.choice(TEMPLATES).format(
            patient=patient, Patient=patient[0].upper() + patient[1:], symptom=symptom,
            course=course, vitals=(vitals[0].upper() + vitals[1:] + ".") if vitals else "",
        ).strip().rstrip(";")
        label = _urgency(base, p_shift, c_shift, v_shift)
        if rng.random() < LABEL_NOISE:
            label = rng.randrange(len(LABELS))
        examples.append(Example(text=" ".join(text.split()), label=label))
    rng.shuffle(examples)
    return examples
